"""Faults end clearly: a full disk names the checkpoint and the space, a busy rendezvous port is
refused within seconds, and killing torchrun ends its ranks."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_checkpoint import ENV, ROOT, train_cmd
from tests.test_launch import free_port, launch_env, write_config

# An fsspec filesystem of our own for the test: in memory, out of space after QUOTA bytes.
FULL_STORE = """
import errno, os
import fsspec
from fsspec.implementations.memory import MemoryFileSystem


class FullFileSystem(MemoryFileSystem):
    protocol = "fullmem"
    store, pseudo_dirs, QUOTA, used = {}, [""], 4096, 0

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("fullmem://"))

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        if "w" in mode:
            write, fs = f.write, type(self)

            def limited(data):
                fs.used += len(data)
                if fs.used > fs.QUOTA:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return write(data)

            f.write = limited
        return f


fsspec.register_implementation("fullmem", FullFileSystem)
"""


def one_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    return write_config(root)


def small_disk(mountpoint: Path) -> list[str] | None:
    """A command prefix that runs its command with a 64 KiB tmpfs on ``mountpoint`` (a private
    mount namespace: root, or an unprivileged user namespace); None where neither is allowed."""
    mount = f"mount -t tmpfs -o size=64k none {mountpoint}"
    for unshare in (["unshare", "--mount"], ["unshare", "--user", "--map-root-user", "--mount"]):
        probe = subprocess.run([*unshare, "sh", "-c", mount], capture_output=True)
        if probe.returncode == 0:
            return [*unshare, "sh", "-c", f'{mount} && exec "$@"', "sh"]
    return None


def test_a_full_local_disk_names_the_checkpoint_and_the_space(config, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    prefix = small_disk(disk)
    if prefix is None:
        pytest.skip("no private tmpfs here (needs root or unprivileged user namespaces)")
    cmd = train_cmd(config, f"train.run_dir={tmp_path / 'run'}", f"checkpoint.dir={disk}/ck",
                    "checkpoint.every=3")  # fmt: skip
    proc = subprocess.run([*prefix, *cmd], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    error = one_error(proc)
    assert f"cannot write {disk}/ck/step-000000003/" in error, error
    assert "No space left on device" in error


def test_a_full_checkpoint_store_names_the_checkpoint_and_the_space(config, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FULL_STORE)
    env = {**ENV, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}"}
    cmd = train_cmd(config, f"train.run_dir={tmp_path / 'run'}", "checkpoint.dir=fullmem://store/ck",
                    "checkpoint.every=3")  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    error = one_error(proc)
    assert "cannot write fullmem:///store/ck/step-000000003" in error, error
    assert "No space left on device" in error


def test_a_busy_rendezvous_port_is_refused_within_seconds(config):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        start = time.perf_counter()
        proc = subprocess.Popen(
            [str(ROOT / "launch.sh"), str(config)], cwd=ROOT, text=True, start_new_session=True,
            env=launch_env(MASTER_PORT=str(port), NPROC_PER_NODE="1"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            pytest.fail("launch.sh waited on a busy rendezvous port")
    assert time.perf_counter() - start < 15 and proc.returncode == 2
    assert f"rendezvous port {port} on 127.0.0.1 is already in use" in err


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text() if entry.isdigit() else ""
        except OSError:
            continue
        if stat and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_killing_torchrun_ends_its_ranks(config, tmp_path):
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen(
        [str(ROOT / "launch.sh"), str(config), f"train.run_dir={run_dir}", "train.epochs=500"],
        cwd=ROOT, env=launch_env(MASTER_PORT=str(free_port()), NPROC_PER_NODE="2"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    ranks = []
    try:
        deadline = time.time() + 300
        while not (run_dir / "config.yaml").exists():  # written once training starts
            assert launcher.poll() is None and time.time() < deadline, "the job did not start"
            time.sleep(0.1)
        ranks = children(launcher.pid)  # launch.sh execs torchrun: its children are the ranks
        assert len(ranks) == 2
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.time() + 5
        while any(alive(r) for r in ranks) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(alive(r) for r in ranks), "ranks outlived their torchrun"
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for pid in filter(alive, ranks):
            os.kill(pid, signal.SIGKILL)
