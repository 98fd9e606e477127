"""The device-side code on a real GPU against the same code on the host (``pytest -m cuda``;
``scripts/gpu_check.sh`` runs these). Skipped cleanly where torch sees no CUDA device.

No DeepSpeed here (the GPU machines we borrow may lack it): the objectives, evaluation, the
log-partition kernel and the prefetcher, built by the same builder as training.
"""

from __future__ import annotations

from itertools import islice

import pytest
import torch

from mqsa_core.config import load_config
from tests.synthetic import write_prepared
from trainer.data.prefetch import prefetched
from trainer.evaluation.evaluate import evaluate
from trainer.model.logpartition import weighted_log_partition
from trainer.runtime.builder import build_components
from trainer.runtime.distributed import DistEnv

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]
MODES = {
    "paper": ["loss.candidates=all"],
    "catalog": ["loss.candidates=sampled", "loss.sampler=mixed", "loss.num_negatives=32"],
    "paper_transition_term": ["loss.candidates=all", "model.transition_term=true"],
    "catalog_transition_term": [
        "loss.candidates=sampled",
        "loss.sampler=mixed",
        "loss.num_negatives=32",
        "model.transition_term=true",
    ],
}


def env_on(device: str) -> DistEnv:
    return DistEnv(rank=0, world=1, local_rank=0, local_world=1, device=torch.device(device))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_prepared(tmp_path_factory.mktemp("cuda") / "data", num_users=96)


def build(data_dir, device: str, mode: str):
    cfg = load_config(None, [f"data.dir={data_dir}", "data.max_len=12", "model.dim=16",
                             "model.dropout=0.0", "train.batch_size=32", *MODES[mode]])  # fmt: skip
    return build_components(cfg, env_on(device))


@pytest.mark.parametrize("mode", list(MODES))
def test_step_on_cuda_matches_the_host(data_dir, mode):
    runs = {d: build(data_dir, d, mode) for d in ("cpu", "cuda")}
    got = {}
    for device, run in runs.items():
        train = next(iter(run.users.train_batches(epoch=1)))
        batch = run.batches(train, 1, 0).to(torch.device(device))
        losses = run.objective(batch)
        grads = torch.autograd.grad(losses.total, list(run.objective.parameters()))
        got[device] = (losses.total.detach().cpu(), [g.cpu() for g in grads])
    torch.testing.assert_close(got["cuda"][0], got["cpu"][0], rtol=1e-4, atol=1e-5)
    for a, b in zip(got["cuda"][1], got["cpu"][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("mode", ["paper", "paper_transition_term"])
def test_evaluation_on_cuda_matches_the_host(data_dir, mode):
    results = {}
    for device in ("cpu", "cuda"):
        run = build(data_dir, device, mode)
        results[device] = evaluate(run.objective.encoder, run.table, run.users, 50,
                                   graph=run.batches.teacher)  # fmt: skip
    assert results["cuda"].get("transition_scale") == results["cpu"].get("transition_scale")
    for split in ("valid", "test"):
        for key, value in results["cpu"][split].items():
            assert abs(results["cuda"][split][key] - value) < 1e-6, (split, key)


@pytest.mark.parametrize("bf16", [False, True])
def test_log_partition_on_cuda_matches_the_host(bf16):
    torch.manual_seed(0)
    queries, table = torch.randn(300, 32), torch.randn(5000, 32) * 0.1
    weights = torch.rand(300)
    values = {}
    for device in ("cpu", "cuda"):
        q = queries.to(device).requires_grad_()
        t = table.to(device).requires_grad_()
        value = weighted_log_partition(q, t, weights.to(device), 128, bf16, True)
        value.backward()
        values[device] = (value.detach().cpu(), q.grad.cpu(), t.grad.cpu())
    for a, b in zip(values["cuda"], values["cpu"], strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2 if bf16 else 1e-4, atol=1e-4)


def test_prefetched_batches_arrive_whole_on_the_gpu(data_dir):
    run = build(data_dir, "cuda", "catalog")
    items = [(t, 1, s) for s, t in enumerate(islice(run.users.train_batches(epoch=1), 3))]
    on_gpu = list(prefetched(iter(items), lambda i: run.batches(*i), torch.device("cuda")))
    for (train, epoch, step), batch in zip(items, on_gpu, strict=True):
        want = run.batches(train, epoch, step)
        for name, value in vars(want).items():
            got = getattr(batch, name)
            assert got.device.type == ("cpu" if name == "host_rows" else "cuda"), name
            assert torch.equal(got.cpu(), value), name
