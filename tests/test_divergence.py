"""A step that goes non-finite ends the job with one line (not one per rank, no torchrun
traceback, exit status 2) that names the step, the part, the path and the setting under which a
replay of the same step was finite; the last good weights are saved."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.synthetic import write_prepared
from trainer.model import cpu_kernels

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(cpu_kernels.missing() is not None, reason=f"{cpu_kernels.missing()}")
def test_a_nan_gradient_stops_the_job_with_one_line_naming_the_switch(tmp_path):
    data = write_prepared(tmp_path / "data", num_users=120, num_items=41)
    command = [
        sys.executable, "-m", "mqsa_ted.torchrun", "--nproc_per_node=2",
        "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:0", "tests/diverge_worker.py",
        "configs/demo.yaml", f"data.dir={data}", f"train.run_dir={tmp_path / 'run'}",
        "data.max_len=12", "model.dim=16", "train.batch_size=32", "train.progress=false",
        "embeddings.backend=dense", "model.transition_term=false", "train.min_steps=0",
        "train.warmup_steps=0", "train.epochs=2",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr
    line = errors[0]
    assert re.search(r"training stopped at epoch 1, step 1 of \d+ \(global step 1\)", line), line
    assert "not finite on the CPU kernel, bf16 path: " in line, line
    assert "the recommendation loss's d/dtable" in line and "TED loss's d/dtable" in line, line
    assert "rerun with train.cpu_kernel=false" in line and "train.lr" not in line, line
    assert (tmp_path / "run" / "last_good.pt").exists()
