"""Leases: one job at a time owns a run directory, a prepared-data directory or an export.

A lease is the JSON file ``<parent>/.<name>.mqsa-ted-lease`` beside the location it guards
(beside, not inside: prepare and export replace or create the location by renames), written
before anything goes into the location::

    {"kind": "run", "token": "...", "host": "node-3", "pid": 4242,
     "started": 1765080000.0, "heartbeat": 1765080123.0, "command": "trainer.train"}

Its holder rewrites ``heartbeat`` every :data:`HEARTBEAT_S` seconds (a daemon thread) and
removes the file when the job ends, however it ends short of SIGKILL. A second job on the same
location is refused in one line naming the holder (:class:`LeaseHeld`). A lease whose holder is
gone is taken over, with a line saying so: its host is this host and its pid is not running, or
its heartbeat is older than :data:`STALE_AFTER_S` (a holder on another host, killed or lost).

Acquiring is first-writer-wins: on a local filesystem a new lease file is created with
``O_EXCL``; on an object store (no exclusive create), and when taking over a stale lease, the job
writes its lease, waits :data:`SETTLE_S` and reads it back: the job whose token is there holds
it, the other is refused.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from mqsa_core.errors import UserError
from mqsa_core.storage import atomic_write_bytes, is_local, url_to_fs

HEARTBEAT_S = 10.0  # seconds between two heartbeats of a held lease
STALE_AFTER_S = 120.0  # a lease without a heartbeat for this long has no live holder
SETTLE_S = 1.0  # on object stores: the wait between writing a lease and reading it back
LEASE_SUFFIX = ".mqsa-ted-lease"


class LeaseHeld(UserError):
    """Another live job holds the lease of the location."""


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one of another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Holder:
    """What a lease file says about the job holding it."""

    kind: str
    token: str
    host: str
    pid: int
    started: float
    heartbeat: float
    command: str

    def gone(self, now: float) -> str | None:
        """Why this holder is no longer running (``pid 12 is not running on node-3``), or None
        while it may still run."""
        if self.host == socket.gethostname() and not pid_alive(self.pid):
            return f"pid {self.pid} is not running on {self.host}"
        if now - self.heartbeat > STALE_AFTER_S:
            return f"no heartbeat for {now - self.heartbeat:.0f} s (over {STALE_AFTER_S:.0f} s)"
        return None

    def describe(self, now: float) -> str:
        started = datetime.datetime.fromtimestamp(self.started, datetime.UTC)
        return (
            f"{self.command} (pid {self.pid} on {self.host}, started "
            f"{started.isoformat(timespec='seconds')}, heartbeat {now - self.heartbeat:.0f} s ago)"
        )


def lease_url(url: str) -> str:
    """The lease file of the location ``url``: ``<parent>/.<name>.mqsa-ted-lease``."""
    parent, _, name = url.rstrip("/").rpartition("/")
    return f"{parent}/.{name}{LEASE_SUFFIX}" if parent else f".{name}{LEASE_SUFFIX}"


def read_holder(url: str) -> Holder | None:
    """The holder in the lease file ``url``; None when there is no file. A file that cannot be
    parsed is a holder of unknown identity that never beats: stale after ``STALE_AFTER_S``."""
    fs, path = url_to_fs(url)
    try:
        with fs.open(path, "r") as f:
            return Holder(**json.load(f))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        mtime = _modified(fs, path)
        return Holder("unknown", "", "unknown host", 0, mtime, mtime, "an unreadable lease file")


def _modified(fs: Any, path: str) -> float:
    try:
        return fs.modified(path).timestamp()
    except (OSError, NotImplementedError, AttributeError):
        return 0.0


class Lease:
    """The lease of one location for this process; a context manager that acquires and
    releases it.

    ``note`` (after :meth:`acquire`) says whether a stale lease was taken over."""

    def __init__(self, location: str, kind: str, setting: str) -> None:
        self.location, self.setting = location.rstrip("/"), setting
        self.url = lease_url(self.location)
        self.fs, self.path = url_to_fs(self.url)
        self.holder = Holder(
            kind=kind,
            token=uuid.uuid4().hex,
            host=socket.gethostname(),
            pid=os.getpid(),
            started=time.time(),
            heartbeat=time.time(),
            command=_command(),
        )
        self.note: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> Lease:
        """Take the lease or raise :class:`LeaseHeld` naming its live holder."""
        self.fs.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        if not self._create_exclusive():
            current = read_holder(self.url)
            now = time.time()
            if current is not None:
                reason = current.gone(now)
                if reason is None:
                    raise self._refusal(current, now)
                self.note = (
                    f"note: taking over the lease of {self.location} from "
                    f"{current.describe(now)}: {reason}"
                )
            self._write()  # a takeover, or any write to an object store: let a rival's land
            time.sleep(SETTLE_S)
        winner = read_holder(self.url)
        if winner is None or winner.token != self.holder.token:
            raise self._refusal(winner, time.time())
        self._thread = threading.Thread(target=self._beat, name="mqsa-lease", daemon=True)
        self._thread.start()
        return self

    def _create_exclusive(self) -> bool:
        """Create the lease file if there is none (locally with ``O_EXCL``: exactly one job
        wins). False when a lease exists, and always on object stores (no exclusive create:
        :meth:`acquire` writes, settles and reads back)."""
        if not is_local(self.url):
            return False
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self.holder), f)
        return True

    def _write(self) -> None:
        self.holder.heartbeat = time.time()
        atomic_write_bytes(self.url, json.dumps(asdict(self.holder)).encode())

    def _refusal(self, holder: Holder | None, now: float) -> LeaseHeld:
        who = holder.describe(now) if holder else "another job (its lease vanished meanwhile)"
        return LeaseHeld(
            f"{self.location} is in use by another job: {who}; wait for it to end or set "
            f"another {self.setting} (a lease whose holder has stopped is taken over: lease file "
            f"{self.url})"
        )

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write()
            except UserError:
                pass  # a missed beat is retried; only STALE_AFTER_S without one frees the lease

    def release(self) -> None:
        """Stop the heartbeat and remove the lease file if it is still this job's."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        current = read_holder(self.url)
        if current is not None and current.token == self.holder.token:
            self.fs.rm(self.path)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _command() -> str:
    """The running command in a few words (``trainer.train``, ``mqsa-ted prepare``)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        return spec.name
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
