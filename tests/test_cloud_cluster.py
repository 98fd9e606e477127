"""prepare on a Spark standalone cluster: a master and one worker started on loopback from the
scripts inside the pyspark package, the job submitted with the very command docs/scaling.md
prints; its output equals local mode's, and its tasks ran in the worker's executor."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pyspark
import pytest

from mqsa_core.config import load_config
from mqsa_core.prepared import read_stats
from spark_jobs.prepare import prepare
from spark_jobs.progress import Progress
from spark_jobs.synth import SynthSpec, write_log
from tests.prepared_compare import assert_same_datasets

ROOT = Path(__file__).resolve().parents[1]
SPARK_CLASS = Path(pyspark.__file__).parent / "bin" / "spark-class"
# the placeholders of the documented command and what the test puts in their place
MASTER, EVENTS, PREPARED = "spark://HOST:7077", "hdfs:///data/events/", "hdfs:///data/prepared/"
CONFIG = "configs/catalog.yaml"
PACKAGES = (
    "mqsa_core",
    "spark_jobs",
    "embeddings",
    "trainer",
    "mqsa_ted",
)  # the project's packages
ENV = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1",  # bind and advertise loopback only
       "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip


def documented_command() -> str:
    """The first bash block of docs/scaling.md's "Spark on a cluster" section."""
    section = (ROOT / "docs" / "scaling.md").read_text().split("## Spark on a cluster", 1)[1]
    return section.split("```bash\n", 1)[1].split("```", 1)[0]


def job_modules() -> set[str]:
    """The project's modules the prepare job imports, as paths in a clone
    (``mqsa_core/config.py``)."""
    code = (
        "import sys, spark_jobs.prepare; print(' '.join(n for n, m in sys.modules.items() "
        f"if n.split('.')[0] in {PACKAGES!r} and getattr(m, '__file__', None)))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    names = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True,
                           capture_output=True, text=True).stdout.split()  # fmt: skip
    return {n.replace(".", "/") + ("/__init__.py" if "." not in n else ".py") for n in names}


def stop(proc: subprocess.Popen) -> None:
    """End ``proc`` and its process group (a worker's executors): SIGTERM, then SIGKILL."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def daemon(stack: ExitStack, log: Path, main_class: str, *args: str, ready: str) -> re.Match:
    """Start ``spark-class MAIN_CLASS ARGS`` in its own process group, stopped when ``stack``
    closes; wait until its log matches ``ready`` (returned)."""
    with open(log, "wb") as out:
        command = [str(SPARK_CLASS), main_class, *args]
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=ENV, start_new_session=True
        )
    stack.callback(stop, proc)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = re.search(ready, log.read_text(errors="replace"))
        if found:
            return found
        assert proc.poll() is None, f"{main_class} exited:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
    raise AssertionError(f"{main_class} not ready after 120 s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """``(master URL, worker's work directory)`` of a standalone master and one worker (1 core,
    1 GiB) on loopback; both stopped at the end of the module, also after a failure."""
    root = tmp_path_factory.mktemp("cluster")
    with ExitStack() as stack:
        master = daemon(stack, root / "master.log", "org.apache.spark.deploy.master.Master",
                        "--host", "127.0.0.1", "--port", "0", "--webui-port", "0",
                        ready=r"Starting Spark master at (spark://\S+)")[1]  # fmt: skip
        daemon(stack, root / "worker.log", "org.apache.spark.deploy.worker.Worker", master,
               "--host", "127.0.0.1", "--cores", "1", "--memory", "1g", "--webui-port", "0",
               "--work-dir", str(root / "work"),
               ready="Successfully registered with master")  # fmt: skip
        yield master, root / "work"


def test_documented_spark_submit_on_a_standalone_cluster_matches_local_mode(
    cluster, spark, tmp_path
):
    master, work = cluster
    events, out, job = tmp_path / "events", tmp_path / "prepared", tmp_path / "job"
    write_log(str(events), SynthSpec(events=3000, users=150, items=60, seed=5))
    # a directory laid out like a clone (the packages, a config), where the block runs
    (job / "configs").mkdir(parents=True)
    for package in PACKAGES:
        (job / package).symlink_to(ROOT / package)
    (job / CONFIG).write_text(f"data:\n  events: {events}\n  dir: {out}\n  num_files: 2\n")
    block = documented_command()
    for placeholder in (MASTER, EVENTS, PREPARED, CONFIG):
        assert placeholder in block, f"docs/scaling.md's command lost {placeholder}"
    block = block.replace(MASTER, master).replace(EVENTS, str(events))
    block = block.replace(PREPARED, str(out))
    with open(tmp_path / "submit.log", "wb") as log:
        command = ["bash", "-euo", "pipefail", "-c", block]
        proc = subprocess.Popen(
            command, cwd=job, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            proc.wait(timeout=540)
        finally:
            stop(proc)
    text = (tmp_path / "submit.log").read_text(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    assert "[prepare] io: events=executors (local), dir=executors (local)" in text
    assert "[prepare] total: users=150, items=60" in text
    # the zip holds every module of the project the job imports (the driver of a cluster-mode
    # submit has nothing else), and the job imports no training code
    imported = job_modules()
    with zipfile.ZipFile(job / "jobs.zip") as shipped:
        missing = imported - set(shipped.namelist())
    assert not missing, f"jobs.zip lacks {sorted(missing)}"
    assert {m.split("/")[0] for m in imported} == {"mqsa_core", "spark_jobs"}
    # the tasks ran in the worker's executor, not in the driver
    executor_logs = list(work.glob("app-*/*/stderr"))
    assert executor_logs and "Running task" in executor_logs[0].read_text(errors="replace")

    cfg = load_config(str(job / CONFIG), [f"data.dir={tmp_path / 'local'}"])
    local_stats = prepare(cfg.data, spark, Progress(log=lambda line: None))
    assert_same_datasets(str(out), cfg.data.dir)
    stats = read_stats(str(out))
    assert stats.pop("version") != local_stats.pop("version")
    assert stats == local_stats
