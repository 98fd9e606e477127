"""Delete only what we created: ownership markers, run locks and the sweep of stale staging.

Ownership marker: every directory the data jobs commit carries ``.mqsa-ted-owned`` (JSON:
``kind``, ``created_by``, ``created_at``), written into its staging directory before anything
else. A directory without the marker of the expected kind is never replaced or removed.
(``mark_owned``/``is_owned`` stand in for the shared helpers of :mod:`mqsa_core.storage`.)

Run lock: while a job writes the output ``<parent>/<name>`` it holds the file
``<parent>/.<name>.lock-<token>`` (JSON: ``pid``, ``host``, ``started``, ``heartbeat``, epoch
seconds), rewritten every ``HEARTBEAT_S`` seconds by a daemon thread and removed at the end.
The lock is written before the run's staging directory ``.<name>.staging-<token>`` exists and
removed after it (and the aside copy ``.<name>.old-<token>`` of the commit) is gone.

A run that was killed (SIGKILL, lost node) leaves them behind; :func:`sweep` removes, at the
start of the next run on the same output, the staging and aside directories of every token
whose lock is stale: its pid is dead on this host, or its heartbeat is older than
``STALE_AFTER_S`` (another host, or a reused pid), or the lock is gone. A directory without
our marker is left alone; a lock that cannot be read counts as live.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field

import fsspec

from mqsa_core.lease import pid_alive
from mqsa_core.prepared import COMPLETE_MARKER
from mqsa_core.storage import StorageError, atomic_write_bytes, full_url, read_json

OWNER_MARKER = ".mqsa-ted-owned"
HEARTBEAT_S = 30.0  # seconds between two heartbeats of a running job's lock
STALE_AFTER_S = 600.0  # a lock whose heartbeat is older than this belongs to no running job
LEFTOVER = re.compile(r"(?P<what>staging|old|lock)-(?P<token>[0-9a-f]{12})(?P<tmp>\.tmp-\w+)?")


def mark_owned(url: str, kind: str) -> None:
    """Write the ownership marker of ``kind`` (``prepared-data``...) into the directory ``url``."""
    marker = {"kind": kind, "created_by": "mqsa-ted", "created_at": time.time()}
    atomic_write_bytes(f"{url.rstrip('/')}/{OWNER_MARKER}", json.dumps(marker).encode())


def owned_kind(url: str) -> str | None:
    """The kind in the ownership marker of the directory ``url``; None without a readable one."""
    try:
        marker = read_json(f"{url.rstrip('/')}/{OWNER_MARKER}")
    except (OSError, ValueError, StorageError):
        return None
    return marker.get("kind") if isinstance(marker, dict) else None


def is_owned(url: str, kind: str) -> bool:
    """Whether the directory ``url`` carries our ownership marker of ``kind``."""
    return owned_kind(url) == kind


def lock_is_live(fs: fsspec.AbstractFileSystem, path: str, now: float) -> bool:
    """Whether the run holding the lock file ``path`` may still be running: the lock exists,
    its heartbeat is at most ``STALE_AFTER_S`` old and, on this host, its pid is alive. A lock
    that cannot be read counts as live (nothing proves its run dead)."""
    if not fs.exists(path):
        return False
    try:
        with fs.open(path, "r") as f:
            lock = json.load(f)
        heartbeat, pid, host = float(lock["heartbeat"]), int(lock["pid"]), str(lock["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return True
    if now - heartbeat > STALE_AFTER_S:
        return False
    return host != socket.gethostname() or pid_alive(pid)


class RunLock:
    """The lock file of one run, with a heartbeat thread while held."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        self.fs, self.path = fs, path
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        payload = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": self.started,
            "heartbeat": time.time(),
        }
        atomic_write_bytes(full_url(self.fs, self.path), json.dumps(payload).encode())

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write()
            except StorageError:
                pass  # a missed beat is retried; only STALE_AFTER_S of them make the lock stale

    def acquire(self) -> None:
        """Write the lock and start the heartbeat."""
        self._write()
        self._thread = threading.Thread(target=self._beat, name="mqsa-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file (if it was written)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        if self.fs.exists(self.path):
            self.fs.rm(self.path)


@dataclass
class Leftovers:
    """One token's entries next to an output: its aside copy of the previous output, its
    staging directory, its lock file (and a temporary file of the lock's atomic write)."""

    old: list[str] = field(default_factory=list)
    staging: list[str] = field(default_factory=list)
    lock: list[str] = field(default_factory=list)


def leftovers(fs: fsspec.AbstractFileSystem, parent: str, name: str) -> dict[str, Leftovers]:
    """The staging/aside directories and lock files of the output ``name`` in ``parent``,
    by token."""
    prefix = f".{name}."
    found: dict[str, Leftovers] = {}
    if not fs.isdir(parent):
        return found
    for path in fs.ls(parent, detail=False):
        base = path.rstrip("/").rsplit("/", 1)[-1]
        match = LEFTOVER.fullmatch(base[len(prefix) :]) if base.startswith(prefix) else None
        if match is None:
            continue
        entry = found.setdefault(match["token"], Leftovers())
        getattr(entry, match["what"]).append(path.rstrip("/"))
    return found


def sweep(fs: fsspec.AbstractFileSystem, parent: str, name: str, kind: str) -> dict[str, int]:
    """Remove the leftovers of dead runs on the output ``parent/name`` (module docstring).

    If the output itself is missing (a run died between the two renames of its commit), the
    previous output is renamed back from its aside copy instead of being removed. Returns the
    counts ``removed`` (directories), ``restored``, ``running`` (live runs on this output) and
    ``not_ours`` (leftover directories without our marker, left alone).
    """
    target = f"{parent}/{name}"
    counts = dict.fromkeys(("removed", "restored", "running", "not_ours"), 0)
    now = time.time()
    for token, entry in sorted(leftovers(fs, parent, name).items()):
        if lock_is_live(fs, f"{parent}/.{name}.lock-{token}", now):  # read now, not listed
            counts["running"] += 1
            continue
        for path in entry.old + entry.staging:
            if not is_owned(full_url(fs, path), kind):
                counts["not_ours"] += 1
            elif (
                path in entry.old
                and not fs.exists(target)
                and fs.exists(f"{path}/{COMPLETE_MARKER}")
            ):
                fs.mv(path, target, recursive=True)
                counts["restored"] += 1
            else:
                fs.rm(path, recursive=True)
                counts["removed"] += 1
        for path in entry.lock:
            if fs.exists(path):
                fs.rm(path)
    return counts
