"""A 2-process torchrun job with DeepSpeed ZeRO-1 matches the 1-process run on the same batches."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.synthetic import write_prepared

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "dist_worker.py")


def run(cmd: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--master_port=0", "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:0"]  # fmt: skip


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("prepared"))


def test_two_ranks_zero1_match_one_rank(prepared, tmp_path):
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    run([sys.executable, WORKER, str(prepared), str(one), "4", "distributed.zero_stage=0"])
    run(torchrun(2) + [WORKER, str(prepared), str(two), "4", "distributed.zero_stage=1"])
    a = torch.load(one, weights_only=True)
    b = torch.load(two, weights_only=True)
    assert a["params"].keys() == b["params"].keys()
    moved = [n for n, v in a["params"].items() if not torch.equal(v, a["initial"][n])]
    assert "table.weight" in moved and len(moved) >= len(a["params"]) - 1  # training happened
    for name, value in a["params"].items():
        torch.testing.assert_close(b["params"][name], value, rtol=1e-4, atol=1e-6, msg=name)
    for split in ("valid", "test"):
        for key, value in a["metrics"][split].items():
            assert abs(b["metrics"][split][key] - value) < 1e-9, (split, key)
