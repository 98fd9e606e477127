"""The transition term (``model.transition_term``): ``w * log(1 + max(G[last item, j] - 1, 0))``
added to every score, against dense references written here: the chunked full softmax (value and
every gradient, the weight's included), the sampled softmax with every item as a candidate, no
target leakage in training, and ``recommend`` from an export (the exact top-k of the combined
scores).
The 1- and 2-rank training and evaluation paths are in tests/test_distributed_train.py."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mqsa_core.config import load_config
from mqsa_ted.export import export_run, load_trained
from mqsa_ted.manifest import TRANSITIONS, ExportError
from mqsa_ted.recommend import Recommender
from tests.synthetic import write_prepared
from tests.test_distributed_train import transition_scores
from tests.test_export import train
from trainer.data.batches import BatchBuilder, accidental_hits
from trainer.data.samplers import NegativeSampler
from trainer.data.teacher import SparseTeacher
from trainer.evaluation.evaluate import TRANSITION_SCALES
from trainer.model.logpartition import weighted_log_partition
from trainer.model.losses import full_softmax_rec_loss, sampled_rec_loss
from trainer.model.transition_term import ScoreBonus, training_bonus


def random_bias(rows: int, items: int, count: int, seed: int = 0) -> ScoreBonus:
    """``count`` distinct random ``(row, item)`` pairs with values in [-2, 2)."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(rows * items, generator=g)[:count]
    values = (torch.rand(count, generator=g) * 4 - 2).requires_grad_()
    return ScoreBonus(flat // items, flat % items, values)


@pytest.mark.parametrize("zero_column", [False, True])
def test_log_partition_with_additions_matches_autograd(zero_column):
    torch.manual_seed(0)
    table = (torch.randn(300, 16) * 0.5).requires_grad_()
    queries = (torch.randn(70, 16) * 2).requires_grad_()
    weights = torch.rand(70)
    bias = random_bias(70, 300, 500)  # rows in every chunk of 32
    anchors = torch.randint(0, 300, (70,))
    value = weighted_log_partition(queries, table, weights, 32, False, zero_column, bias, anchors)
    got = torch.autograd.grad(value, [queries, table, bias.values])
    logits = (queries @ table.T).index_put((bias.rows, bias.items), bias.values, accumulate=True)
    if zero_column:
        logits = torch.cat([logits, torch.zeros(70, 1)], dim=1)
    want = (torch.logsumexp(logits, dim=1) * weights).sum()
    torch.testing.assert_close(value, want)
    for g, w in zip(got, torch.autograd.grad(want, [queries, table, bias.values]), strict=True):
        torch.testing.assert_close(g, w)


def test_bf16_log_partition_with_additions_stays_close_to_float32():
    torch.manual_seed(1)
    table = (torch.randn(2000, 32) * 0.3).requires_grad_()
    queries = (torch.randn(300, 32) * 2).requires_grad_()
    bias = random_bias(300, 2000, 3000, seed=1)
    out = {}
    for bf16 in (False, True):
        value = weighted_log_partition(queries, table, torch.ones(300), 128, bf16, True, bias)
        out[bf16] = (value.detach(), *torch.autograd.grad(value, [queries, table, bias.values]))
    assert abs(float(out[True][0] - out[False][0])) < 1e-2 * abs(float(out[False][0]))
    for a, b in zip(out[True][1:], out[False][1:], strict=True):
        assert float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0)) > 0.999


def tiny_teacher() -> SparseTeacher:
    """Items 0..5; 0 -> 1 seen 3 times, 0 -> 2 once, 1 -> 2 twice."""
    src, dst, count = np.array([0, 0, 1]), np.array([1, 2, 2]), np.array([3.0, 1.0, 2.0])
    return SparseTeacher.from_edges(src, dst, count, 6, tau=0.1)


def test_a_position_does_not_see_its_own_transition():
    """At the position 0 -> 1 the edge (0, 1) counts the 2 OTHER transitions (log(1 + 2 - 1)),
    the edge (0, 2) all of its 1 (log(1 + 0): a single sighting is below the floor); at 1 -> 2
    the edge's one other transition counts 0 too; the targets' own additions are (0, 1), (1, 2)."""
    teacher = tiny_teacher()
    batch = BatchBuilder(6, teacher)(torch.tensor([[0, 1, 2]]))  # inputs 0, 1 -> targets 1, 2
    weight = torch.tensor([2.0])
    bonus, own = training_bonus(weight, teacher, batch.edge_head, batch.edge, batch.edge_succ,
                                batch.edge_is_target, batch.positions.shape[0])  # fmt: skip
    got = {(int(r), int(i)): float(v) for r, i, v in zip(bonus.rows, bonus.items, bonus.values,
                                                          strict=True)}  # fmt: skip
    want = {(0, 1): 2 * math.log(2), (0, 2): 0.0, (1, 2): 0.0}
    assert got == pytest.approx(want)
    assert own.tolist() == pytest.approx([2 * math.log(2), 0.0])


def test_sampled_softmax_with_every_item_equals_the_full_softmax_with_the_term():
    torch.manual_seed(2)
    n, dim = 6, 8
    teacher = tiny_teacher()
    batch = BatchBuilder(n, teacher)(torch.tensor([[0, 1, 2], [5, 0, 2]]))
    items = (torch.randn(n, dim) * 0.5).requires_grad_()
    queries = torch.randn(batch.positions.shape[0], dim).requires_grad_()
    weight = torch.tensor([1.5], requires_grad=True)
    term = training_bonus(weight, teacher, batch.edge_head, batch.edge, batch.edge_succ,
                          batch.edge_is_target, batch.positions.shape[0])  # fmt: skip
    targets = batch.targets
    full = full_softmax_rec_loss(queries, items[targets], items, 4.0, 2, False, term)
    # the reference: dense scores plus the additions, one more zero class (the padding row)
    logits = (queries @ items.T).index_put((term[0].rows, term[0].items), term[0].values,
                                           accumulate=True)  # fmt: skip
    logits = torch.cat([logits, torch.zeros(len(targets), 1)], dim=1)
    want = F.cross_entropy(logits, targets, reduction="sum") / 4.0
    torch.testing.assert_close(full, want)
    cands = NegativeSampler("all", n, 0).sample(targets)
    head, cand, edge = accidental_hits(batch.edge_head, batch.edge_succ, cands.ids)
    at_cands = (ScoreBonus(head, cand, term[0].values[edge]), term[1])
    sampled = sampled_rec_loss(queries, targets, items[targets], cands.ids, cands.log_q,
                               items[cands.ids], 4.0, at_cands)  # fmt: skip
    torch.testing.assert_close(sampled, want)
    params = [queries, items, weight]
    for a, b in zip(torch.autograd.grad(full, params, retain_graph=True),
                    torch.autograd.grad(want, params, retain_graph=True), strict=True):  # fmt: skip
        torch.testing.assert_close(a, b)
    for a, b in zip(torch.autograd.grad(sampled, params, retain_graph=True),
                    torch.autograd.grad(want, params), strict=True):  # fmt: skip
        torch.testing.assert_close(a, b)


def test_recommend_returns_the_exact_top_k_of_the_combined_scores(tmp_path):
    data = write_prepared(tmp_path / "data")
    run = train(data, tmp_path / "run", "model.transition_term=true")
    out = tmp_path / "export"
    export_run(str(run), str(out), faiss_kind="flat")
    cfg, encoder, table = load_trained(str(run))
    assert float(encoder.transition_weight.detach()) != 1.0  # trained from its initial 1
    assert float(encoder.transition_scale) in TRANSITION_SCALES  # chosen on validation
    weight = float(encoder.transition_weight.detach() * encoder.transition_scale)
    log_counts = transition_scores(data, 40)  # [N, N] the feature of G, built densely
    rec = Recommender(str(out))
    histories = [[3, 17, 5], [8], [30, 2, 2, 11]]
    results = rec.recommend([[f"i{i}" for i in h] for h in histories], k=10)
    for history, result in zip(histories, results, strict=True):
        ids = torch.tensor([history])
        with torch.no_grad():
            query = encoder(table.lookup(ids), ids != 40, last_only=True)[0, -1]
        scores = table.all_items().detach() @ query + weight * log_counts[history[-1]]
        scores[history] = -math.inf  # paper protocol: the history is never recommended
        want = [f"i{j}" for j in torch.argsort(scores, descending=True, stable=True)[:10]]
        assert result.items == want
        np.testing.assert_allclose(result.scores, scores[torch.argsort(
            scores, descending=True, stable=True)[:10]].numpy(), rtol=1e-5, atol=1e-5)  # fmt: skip
    # the graph is part of the export's trust boundary: a replaced file is refused
    graph_file = Path(rec.version_url) / TRANSITIONS
    graph_file.write_bytes(graph_file.read_bytes()[:-8] + b"tampered")
    with pytest.raises(ExportError, match="does not match the sha256"):
        Recommender(str(out))


def test_a_warm_start_refuses_a_changed_transition_term(tmp_path):
    """The term's weight is part of the model's shape: no silent half-initialised model."""
    from trainer.runtime.warm_start import WarmStartError, previous_items

    data = write_prepared(tmp_path / "data")
    run = train(data, tmp_path / "run")
    cfg = load_config(None, [f"data.dir={data}", "data.max_len=12", "model.dim=16",
                             "model.transition_term=true"])  # fmt: skip
    with pytest.raises(WarmStartError, match="model.transition_term was False there"):
        previous_items(cfg, str(run))
