"""launch.sh: two invocations on this machine act as two nodes that rendezvous and train together;
a failing rank makes the whole job exit non-zero with that rank's error."""

import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.synthetic import write_prepared

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(tmp_path: Path) -> Path:
    data = write_prepared(tmp_path / "data")
    config = tmp_path / "tiny.yaml"
    config.write_text(
        f"data:\n  dir: {data}\n  max_len: 12\nmodel:\n  dim: 16\n"
        f"train:\n  epochs: 2\n  batch_size: 32\n  run_dir: {tmp_path / 'run'}\n  progress: false\n"
    )
    return config


def launch_env(**extra: str) -> dict:
    return {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), **extra}


def test_two_nodes_rendezvous_and_train_together(tmp_path):
    config = write_config(tmp_path)
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            [str(ROOT / "launch.sh"), str(config)],
            cwd=ROOT,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=launch_env(
                NNODES="2",
                NODE_RANK=str(rank),
                NPROC_PER_NODE="1",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                RDZV_ID=f"test-{port}",
            ),
        )  # fmt: skip
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for node, output in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, output[-3000:]
    assert "world 2" in outputs[0] + outputs[1]  # one job of two ranks, not two jobs of one
    assert (tmp_path / "run" / "metrics.json").exists()


def test_a_failing_rank_fails_the_job(tmp_path):
    config = write_config(tmp_path)
    proc = subprocess.run(
        [str(ROOT / "launch.sh"), str(config), "data.dir=/nonexistent/prepared"],
        cwd=ROOT, env=launch_env(NPROC_PER_NODE="2", MASTER_PORT=str(free_port())),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "/nonexistent/prepared" in proc.stdout + proc.stderr
