"""2-process torchrun jobs match 1-process runs on the same global batches, for both item-table
backends and catalogue mode; the TorchRec table with SGD matches the dense table with SGD; ranks
streaming uneven parts of sequences/ train a whole epoch together and evaluate exactly; every
evaluation equals a brute-force reference written here (METHOD.md "Evaluation": the whole train
history masked, a target inside it a miss; or nothing masked under the repeat-aware protocol)."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mqsa_core.config import load_config
from tests.dist_worker import BASE
from tests.synthetic import write_prepared
from trainer.data.batches import trim
from trainer.data.sequences import load_sequences, load_transitions
from trainer.evaluation.evaluate import TRANSITION_SCALES
from trainer.model.encoder import MQSAEncoder

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "dist_worker.py")
STEPS = "4"
SGD = "model.l2=0.0,train.optimizer=sgd,train.lr=0.05,embeddings.lr=0.05"
LINEAR = "train.epochs=1,train.warmup_steps=2,train.lr_schedule=linear"
CASES = {
    "dense_zero1": "distributed.zero_stage=1",
    "torchrec_rowwise_adagrad": "embeddings.backend=torchrec,embeddings.optimizer=rowwise_adagrad",
    "torchrec_sgd": f"embeddings.backend=torchrec,embeddings.optimizer=sgd,{SGD}",
    "dense_sgd": SGD,
    # the learning-rate schedule over the run's 4 steps: factors 0.5, 1, 1, 0.5 on both parts
    "torchrec_sgd_linear": f"embeddings.backend=torchrec,embeddings.optimizer=sgd,{SGD},{LINEAR}",
    "dense_sgd_linear": f"{SGD},{LINEAR}",
    "catalog_uniform": "embeddings.backend=torchrec,loss.candidates=sampled,"
    "loss.sampler=uniform,loss.num_negatives=16",
    "dense_repeat_aware": "train.eval_protocol=repeat_aware",
    # in-batch negatives from the whole global batch: the same candidates on every rank
    "catalog_mixed_shared": "loss.candidates=sampled,loss.sampler=mixed,loss.num_negatives=16",
    # the transition term in the full and the sampled softmax (its weight is trained too)
    "dense_transition_term": "model.transition_term=true",
    "catalog_transition_term": "embeddings.backend=torchrec,loss.candidates=sampled,"
    "loss.sampler=uniform,loss.num_negatives=16,model.transition_term=true",
}
# 4 steps = the whole epoch; the ranks stream 64 and 56 users (row groups of 16, 16, 8 per file)
STREAM = "embeddings.backend=torchrec,data.stream=true,data.shuffle_buffer=20"


def run(cmd: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:0"]  # fmt: skip


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dist")
    data = write_prepared(root / "data", num_files=3, row_group_size=16)
    one, two = root / "one.pt", root / "two.pt"
    cases = [*CASES.values(), STREAM]
    run([sys.executable, WORKER, str(data), str(one), STEPS, *cases])
    run(torchrun(2) + [WORKER, str(data), str(two), STEPS, *cases])
    a, b = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
    out = {name: (a[case], b[case]) for name, case in {**CASES, "stream": STREAM}.items()}
    return {**out, "data_dir": data}


# The key bias adds the same constant to every score of a query, which the softmax ignores: its
# true gradient is exactly 0, so Adam turns rounding noise into steps of up to lr. It can only
# be compared up to that bound (steps x lr = 4e-3).
NOISE_ONLY = ("k_proj.bias",)


def assert_same_params(a: dict, b: dict, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        if name.endswith(NOISE_ONLY):
            assert (b[name] - value).abs().max() <= int(STEPS) * 1e-3 + 1e-7, name
            continue
        torch.testing.assert_close(b[name], value, rtol=rtol, atol=atol, msg=name)


def assert_trained(run: dict) -> None:
    moved = [n for n, v in run["params"].items() if not torch.equal(v, run["initial"][n])]
    assert "item_table" in moved and len(moved) >= len(run["params"]) - 1


def assert_same_metrics(a: dict, b: dict) -> None:
    for split in ("valid", "test"):
        for key, value in a[split].items():
            assert abs(b[split][key] - value) < 1e-9, (split, key)


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_match_one_rank(results, case):
    one, two = results[case]
    assert_trained(one)
    assert_same_params(one["params"], two["params"])
    assert_same_metrics(one["metrics"], two["metrics"])


@pytest.mark.parametrize("world", [1, 2])
def test_streaming_ranks_train_and_evaluate_exactly(results, world):
    run = results["stream"][world - 1]
    assert_trained(run)  # a whole epoch, both ranks stepping together over uneven parts
    assert_same_metrics(run["metrics_in_memory"], run["metrics"])


def test_torchrec_sgd_matches_dense_sgd(results):
    for world in (0, 1):
        dense, torchrec = results["dense_sgd"][world], results["torchrec_sgd"][world]
        assert_same_params(dense["initial"], torchrec["initial"], rtol=0, atol=0)
        assert_same_params(dense["params"], torchrec["params"])


def test_the_schedule_scales_the_table_and_the_dense_part_alike(results):
    for world in (0, 1):
        dense, torchrec = results["dense_sgd_linear"][world], results["torchrec_sgd_linear"][world]
        assert_same_params(dense["params"], torchrec["params"])
        constant = results["dense_sgd"][world]
        for name in ("item_table", "long_norm.weight"):  # both parts moved less (factors < 1)
            moved = (dense["params"][name] - dense["initial"][name]).norm()
            moved_at_constant = (constant["params"][name] - constant["initial"][name]).norm()
            assert 0 < moved < 0.9 * moved_at_constant, name


def transition_scores(data_dir: Path, n: int) -> torch.Tensor:
    """``[N, N]`` ``log(1 + max(G[i, j] - 1, 0))`` from the train transition graph, built densely
    here."""
    src, dst, count = load_transitions(str(data_dir))
    graph = torch.zeros(n, n, dtype=torch.float64)
    graph.index_put_((torch.from_numpy(src), torch.from_numpy(dst)),
                     torch.from_numpy(count).double(), accumulate=True)  # fmt: skip
    return torch.log1p((graph - 1).clamp(min=0)).float()


def brute_force_metrics(params: dict, data_dir: Path, protocol: str) -> dict:
    """The reference evaluation, one user at a time: score every item (plus ``s * w * log(1 +
    G[last item, j])`` with the transition term), mask the user's whole train history (plus
    the validation item for the test split) under ``paper``, rank the target by strictly
    higher scores among the unmasked items; a masked target is a miss. With the term, the
    metrics of the scale ``s`` in TRANSITION_SCALES with the best valid NDCG@20 (the first of
    equals), and that scale."""
    term = "transition_weight" in params
    cfg = load_config(None, [f"data.dir={data_dir}", *BASE, f"model.transition_term={term}"])
    seqs = load_sequences(cfg.data)
    n = seqs.num_items
    encoder = MQSAEncoder(cfg.model, cfg.data.max_len).eval()
    encoder.load_state_dict({k: v for k, v in params.items() if k != "item_table"})
    items = params["item_table"]  # [N, D]
    padded = torch.cat([items, torch.zeros(1, items.shape[1])])
    by_scale = {}
    for scale in TRANSITION_SCALES if term else (1.0,):
        result = {}
        for split in ("valid", "test"):
            inputs = trim(seqs.train if split == "valid" else seqs.test_inputs(), n)
            targets = seqs.valid if split == "valid" else seqs.test
            with torch.no_grad():
                queries = encoder(padded[inputs], inputs != n, last_only=True)[:, -1]
            scores = queries @ items.T  # [U, N]
            if term:
                weight = scale * params["transition_weight"]
                scores += weight * transition_scores(data_dir, n)[inputs[:, -1]]
            result[split] = split_metrics(seqs, split, targets, scores, protocol)
        by_scale[scale] = result
    best = max(by_scale, key=lambda scale: by_scale[scale]["valid"]["NDCG@20"])
    return {**by_scale[best], "transition_scale": best} if term else by_scale[best]


def split_metrics(seqs, split: str, targets: torch.Tensor, scores: torch.Tensor,
                  protocol: str) -> dict:  # fmt: skip
    """HR@K / NDCG@K of ``targets`` ranked in ``scores [U, N]``, one user at a time."""
    n, offsets = seqs.num_items, seqs.history_offsets
    sums = {f"{m}@{k}": 0.0 for k in (5, 10, 20) for m in ("HR", "NDCG")}
    for u in range(seqs.num_users):
        history = set(seqs.history_items[offsets[u] : offsets[u + 1]].tolist())
        if split == "test":
            history.add(int(seqs.valid[u]))
        mask = history if protocol == "paper" else set()
        target = int(targets[u])
        if target in mask:
            continue  # a miss
        higher = [j for j in range(n) if j not in mask and j != target
                  and scores[u, j] > scores[u, target]]  # fmt: skip
        rank = len(higher) + 1
        for k in (5, 10, 20):
            if rank <= k:
                sums[f"HR@{k}"] += 1.0
                sums[f"NDCG@{k}"] += 1.0 / math.log2(rank + 1)
    return {key: value / seqs.num_users for key, value in sums.items()}


def test_the_data_exercises_the_protocol(results):
    """Some targets repeat a history item and some histories are longer than max_len."""
    cfg = load_config(None, [f"data.dir={results['data_dir']}", *BASE])
    seqs = load_sequences(cfg.data)
    lengths = seqs.history_offsets[1:] - seqs.history_offsets[:-1]
    assert int((lengths > cfg.data.max_len).sum()) >= 10
    repeats = sum(
        int(seqs.test[u]) in set(seqs.history_items[seqs.history_offsets[u] :
                                                    seqs.history_offsets[u + 1]].tolist())
        for u in range(seqs.num_users)
    )  # fmt: skip
    assert repeats >= 5


@pytest.mark.parametrize("case", [*CASES, "stream"])
def test_every_evaluation_equals_the_brute_force_reference(results, case):
    protocol = "repeat_aware" if "repeat_aware" in (CASES.get(case) or "") else "paper"
    for world in (0, 1):
        run = results[case][world]
        want = brute_force_metrics(run["params"], results["data_dir"], protocol)
        assert_same_metrics(want, run["metrics"])
        assert want.get("transition_scale") == run["metrics"].get("transition_scale")
