"""One job at a time owns a run directory, a prepared-data directory or an export
(``mqsa_core.lease``): a second job is refused in one line naming the holder, a lease whose holder
is gone is taken over with a line saying so; on a local filesystem and on S3 (moto). A run
directory of someone else's files is refused and left as it was."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
import s3fs

from mqsa_core.lease import STALE_AFTER_S, Lease, LeaseHeld, lease_url
from tests.s3_server import S3Server
from tests.synthetic import write_prepared

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
BUCKET = "mqsa-lease"


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


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "runs" / "a")
    request.getfixturevalue("s3")
    return f"s3://{BUCKET}/{tmp_path.name}/runs/a"


def write_lease(location: str, **holder) -> None:
    now = time.time()
    lease = {"kind": "run", "token": "x" * 32, "host": socket.gethostname(),
             "pid": os.getpid(), "started": now - 5, "heartbeat": now,
             "command": "trainer.train", **holder}  # fmt: skip
    with fsspec.open(lease_url(location), "w") as f:
        json.dump(lease, f)


def test_a_second_job_is_refused_naming_the_holder(location):
    with Lease(location, "run", "train.run_dir") as first:
        start = time.monotonic()
        with pytest.raises(LeaseHeld) as refused:
            Lease(location, "run", "train.run_dir").acquire()
        assert time.monotonic() - start < 5
        message = str(refused.value)
        assert f"{location} is in use by another job: " in message
        assert f"pid {os.getpid()} on {socket.gethostname()}" in message
        assert "set another train.run_dir" in message and "\n" not in message
        assert first.note is None
    fs, path = fsspec.core.url_to_fs(lease_url(location))
    assert not fs.exists(path)  # released
    with Lease(location, "run", "train.run_dir"):  # free again
        pass


def test_a_lease_whose_holder_is_gone_is_taken_over(location):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    write_lease(location, pid=int(dead.stdout))  # this host, a pid that has ended
    with Lease(location, "run", "train.run_dir") as lease:
        assert lease.note is not None
        assert f"pid {int(dead.stdout)} is not running on {socket.gethostname()}" in lease.note
    stale = time.time() - STALE_AFTER_S - 30
    write_lease(location, host="another-node", pid=1, heartbeat=stale)  # no heartbeat for long
    with Lease(location, "run", "train.run_dir") as lease:
        assert "no heartbeat for" in lease.note
    write_lease(location, host="another-node", pid=1)  # another node, beating: live
    with pytest.raises(LeaseHeld, match="pid 1 on another-node"):
        Lease(location, "run", "train.run_dir").acquire()


def config(root: Path) -> Path:
    data = write_prepared(root / "data", num_users=160)
    path = root / "tiny.yaml"
    path.write_text(
        f"data:\n  dir: {data}\n  max_len: 12\nmodel:\n  dim: 16\n"
        "train:\n  epochs: 200\n  batch_size: 16\n  progress: false\n  threads: 1\n"
    )
    return path


def test_two_trainings_into_one_run_dir(tmp_path):
    """The second is refused within seconds in one line; the first goes on undisturbed."""
    cfg, run_dir = config(tmp_path), tmp_path / "run"
    train = [sys.executable, "-m", "trainer.train", str(cfg), f"train.run_dir={run_dir}"]
    first = subprocess.Popen(train, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.json").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.1)
        start = time.monotonic()
        second = subprocess.run(train + ["train.epochs=3"], cwd=ROOT, env=ENV,
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        assert time.monotonic() - start < 30
        assert second.returncode == 2, second.stderr
        assert second.stderr.count("\n") == 1 and second.stderr.startswith("error: ")
        assert (
            f"{run_dir} is in use by another job: trainer.train (pid {first.pid}" in second.stderr
        )
        assert first.poll() is None
    finally:
        first.kill()
        first.communicate()


def test_a_run_dir_of_someone_elses_files_is_refused_and_left_as_it_was(tmp_path):
    cfg, mine = config(tmp_path), tmp_path / "my-folder"
    mine.mkdir()
    (mine / "model.pt").write_bytes(b"my own weights")
    (mine / "metrics.json").write_text("{}")
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.train", str(cfg), f"train.run_dir={mine}"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: train.run_dir={mine} holds files this project did not write (no "
        ".mqsa-ted-owned marker): refusing to write into it. Choose a new or empty directory "
        "for the run"
    ]
    assert sorted(p.name for p in mine.iterdir()) == ["metrics.json", "model.pt"]
    assert (mine / "model.pt").read_bytes() == b"my own weights"
    assert not (tmp_path / ".my-folder.mqsa-ted-lease").exists()


def test_a_second_prepare_into_one_data_dir_is_refused(location):
    """The prepare job's output staging takes the lease of ``data.dir`` before it sweeps or
    writes anything; a second job is refused and leaves no staging directory behind."""
    from spark_jobs.io import staged_output

    with staged_output(location, "prepared-data"):
        with pytest.raises(LeaseHeld, match="set another data.dir"):
            with staged_output(location, "prepared-data"):
                pass
        fs, path = fsspec.core.url_to_fs(location)
        parent = path.rsplit("/", 1)[0]
        fs.invalidate_cache()
        staging = [p for p in fs.ls(parent, detail=False) if ".staging-" in p]
        assert len(staging) == 1  # the first job's only
