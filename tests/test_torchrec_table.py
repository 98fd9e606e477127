"""TorchRec-sharded item table: against unsharded references, and 2 ranks against 1 rank.

The checks live in ``tests/torchrec_worker.py`` (real TorchRec, fbgemm and DeepSpeed over gloo);
this file launches it once as a single process and once under torchrun with 2 processes.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from embeddings.torchrec_table import fused_params, init_rows

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "torchrec_worker.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
            "--master_port=0", "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:0"]  # fmt: skip


def run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def run_ok(cmd: list[str]) -> None:
    proc = run(cmd)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def test_init_rows_do_not_depend_on_the_split():
    whole = init_rows(0, 70_001, 4, 0.01, 7, num_items=70_000)
    assert torch.count_nonzero(whole[70_000]) == 0  # padding row
    for start, stop in ((0, 3), (65_530, 65_540), (123, 70_001)):
        torch.testing.assert_close(init_rows(start, stop, 4, 0.01, 7, 70_000), whole[start:stop])
    assert 0.009 < whole.std().item() < 0.011


def test_fused_optimizer_arguments():
    assert "weight_decay" in fused_params("rowwise_adagrad", 0.1, 1e-4, on_cuda=False)
    with pytest.raises(ValueError, match="CUDA"):
        fused_params("adam", 0.1, 0.0, on_cuda=False)
    with pytest.raises(ValueError, match="no weight decay"):
        fused_params("sgd", 0.1, 1e-4, on_cuda=False)


def test_sharded_table_matches_references_and_two_ranks_match_one(tmp_path):
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    run_ok([sys.executable, WORKER, str(one), str(tmp_path / "ckpt1")])
    run_ok(TORCHRUN + [WORKER, str(two), str(tmp_path / "ckpt2")])
    a = torch.load(one, weights_only=True)
    b = torch.load(two, weights_only=True)
    assert a.keys() == b.keys()
    for name, value in a.items():
        if name.endswith("k_proj.bias"):
            continue  # its gradient is exactly zero (softmax ignores it): Adam moves it by noise
        torch.testing.assert_close(b[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_a_failing_rank_fails_the_job(tmp_path):
    """Rank 1 raises while rank 0 waits in a collective: the job exits non-zero, no hang."""
    proc = run(TORCHRUN + [WORKER, str(tmp_path / "x.pt"), str(tmp_path / "ckpt")], FAIL_RANK="1")
    assert proc.returncode != 0
    assert "injected failure on rank 1" in proc.stdout + proc.stderr
