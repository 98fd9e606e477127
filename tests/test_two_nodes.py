"""Two nodes x 1 rank on loopback, each started from its own working directory, as two machines
that share no filesystem (docs/scaling.md, what must be shared):

- with a relative ``train.run_dir`` each node would write its own directory: both nodes are
  refused at the start, in one line naming the path and the node, well within 30 s;
- with the S3 server (moto) as the only shared storage (prepared data and run directory in the
  bucket), SIGKILL of one node mid-epoch, then both started again with the same command:
  the run resumes from the bucket and ends with an uninterrupted run's exact metrics.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
import s3fs

from tests.s3_server import S3Server
from tests.synthetic import write_prepared
from tests.test_launch import free_port

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "mqsa-nodes"
CONFIG = """\
data:
  dir: {data}
  max_len: 12
model:
  dim: 16
train:
  epochs: 4
  batch_size: 16
  progress: false
  threads: 1
checkpoint:
  every: 3
  keep: 2
"""


def start_node(rank: int, cwd: Path, port: int, config: Path, *overrides: str, env: dict):
    """One "node": torchrun with one process, node rank ``rank``, started in ``cwd``."""
    cmd = [
        sys.executable, "-m", "mqsa_ted.torchrun", "--nnodes=2", f"--node_rank={rank}",
        "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
        "--rdzv_id=two-nodes", f"--rdzv_conf=is_host={'true' if rank == 0 else 'false'}",
        "-m", "trainer.train", str(config), *overrides,
    ]  # fmt: skip
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        cmd, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip


def run_nodes(tmp: Path, config: Path, *overrides: str, env: dict, timeout: float = 300):
    """Both nodes to their end: ``[(exit status, stdout, stderr)]`` by node rank."""
    port = free_port()
    nodes = [start_node(r, tmp / f"node{r}", port, config, *overrides, env=env) for r in (0, 1)]
    outputs = [n.communicate(timeout=timeout) for n in nodes]
    return [(n.returncode, *output) for n, output in zip(nodes, outputs, strict=True)]


def node_env(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def test_nodes_without_shared_storage_are_refused_at_the_start(tmp_path):
    data = write_prepared(tmp_path / "data", num_users=160)
    config = tmp_path / "tiny.yaml"
    config.write_text(CONFIG.format(data=data))
    start = time.monotonic()
    results = run_nodes(tmp_path, config, "train.run_dir=runs/relative", env=node_env())
    elapsed = time.monotonic() - start
    assert elapsed < 30, f"refused after {elapsed:.0f} s"
    for rank, (status, out, err) in enumerate(results):
        assert status == 2, f"node {rank}: {status}\n{out}\n{err}"
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1, err
        assert "train.run_dir=runs/relative is not shared storage: rank 1 on" in lines[0]
        assert "Traceback" not in err
    assert not (tmp_path / "node0" / "runs" / "relative" / "checkpoints").exists()


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    server = S3Server().start()
    with pytest.MonkeyPatch.context() as env:
        for key, value in server.environ().items():
            env.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()
        fsspec.filesystem("s3").mkdir(BUCKET)
        yield server
    server.stop()


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def comparable(url: str) -> dict:
    """A run's ``metrics.json`` without the wall-clock fields."""
    with fsspec.open(url, "r") as f:
        metrics = json.load(f)
    for record in metrics["epochs"]:
        record.pop("seconds"), record.pop("eval_seconds", None)
    return metrics


def mid_epoch_steps(run_url: str) -> list[int]:
    """Steps of the run's complete checkpoints taken inside an epoch (10 steps per epoch)."""
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()  # s3fs caches listings
    done = fs.glob(f"{run_url.removeprefix('s3://')}/checkpoints/step-*/COMPLETE")
    steps = [int(p.split("/")[-2].split("-")[1]) for p in done]
    return [s for s in steps if s % 10]


def test_two_nodes_sharing_only_s3_resume_after_a_node_is_killed(s3, tmp_path):
    fs = fsspec.filesystem("s3")
    local = write_prepared(tmp_path / "data", num_users=160)
    fs.put(f"{local}/", f"{BUCKET}/prepared", recursive=True)
    config = tmp_path / "s3.yaml"
    config.write_text(CONFIG.format(data=f"s3://{BUCKET}/prepared"))
    env = node_env(**s3.environ())

    straight = f"s3://{BUCKET}/runs/straight"
    for status, out, err in run_nodes(tmp_path / "a", config, f"train.run_dir={straight}",
                                      env=env):  # fmt: skip
        assert status == 0, f"{out}\n{err}"

    killed = f"s3://{BUCKET}/runs/killed"
    port = free_port()
    nodes = [
        start_node(
            r, tmp_path / "b" / f"node{r}", port, config, f"train.run_dir={killed}", env=env
        )  # fmt: skip
        for r in (0, 1)
    ]
    deadline = time.monotonic() + 240
    while not any(step > 10 for step in mid_epoch_steps(killed)):
        ended = [n.communicate() for n in nodes if n.poll() is not None]
        assert not ended, f"a node ended before it could be killed: {ended}"
        assert time.monotonic() < deadline, "no mid-epoch checkpoint in time"
        time.sleep(0.2)
    for pid in (*children(nodes[1].pid), nodes[1].pid):  # node 1 dies: its rank and torchrun
        os.kill(pid, signal.SIGKILL)
    nodes[1].communicate()
    _, err = nodes[0].communicate(timeout=120)  # node 0 loses its peer and stops, in one line
    assert nodes[0].returncode == 1, err
    assert "error: rank 0 lost its connection to another rank" in err
    assert "Traceback" not in err
    assert (
        not fs.exists(f"{BUCKET}/runs/killed/metrics.json")
        or len(comparable(f"{killed}/metrics.json")["epochs"]) < 4
    )

    results = run_nodes(tmp_path / "c", config, f"train.run_dir={killed}", env=env)
    for status, out, err in results:
        assert status == 0, f"{out}\n{err}"
    assert "resumed from s3://" in results[0][1]
    assert comparable(f"{killed}/metrics.json") == comparable(f"{straight}/metrics.json")
