"""The run directory: resolved config, ``metrics.json`` and model weights, written atomically.

One job at a time owns a run directory (:meth:`RunDir.claim`: a lease, ``mqsa_core.lease``), and
only a directory this project created, or an empty one, is written into.
"""

from __future__ import annotations

from mqsa_core.config import Config
from mqsa_core.errors import UserError
from mqsa_core.lease import Lease
from mqsa_core.storage import (
    OWNER_MARKER,
    atomic_write_bytes,
    mark_owned,
    remove_owned,
    url_to_fs,
    write_json,
)

RUN_KIND = "run"


class RunDirError(UserError):
    """The run directory holds files this project did not write."""


class RunDir:
    """``<run_dir>/config.yaml``, ``metrics.json``, ``model.pt`` (best-validation weights)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.created = False  # by this job's claim (then removed again if nothing was written)

    def path(self, name: str) -> str:
        return f"{self.url}/{name}"

    def claim(self) -> Lease:
        """Take the run directory for this job (rank 0, before anything is written): its
        lease, then its ownership marker. Raises :class:`~mqsa_core.lease.LeaseHeld` while another
        job holds it, :class:`RunDirError` for a directory of files this project did not
        write (nothing in it is changed)."""
        lease = Lease(self.url, RUN_KIND, "train.run_dir").acquire()
        fs, path = url_to_fs(self.url)
        self.created = not fs.exists(path)
        try:
            self.own()
        except RunDirError:
            lease.release()
            raise
        return lease

    def own(self) -> None:
        """Mark the directory as ours (creating it), or raise :class:`RunDirError` when it
        holds files this project did not write."""
        if not mark_owned(self.url, RUN_KIND):
            raise RunDirError(
                f"train.run_dir={self.url} holds files this project did not write (no "
                f"{OWNER_MARKER} marker): refusing to write into it. Choose a new or empty "
                "directory for the run"
            )

    def remove_if_unused(self) -> None:
        """Remove the directory again if this job's claim created it and nothing but the
        ownership marker went into it (a run refused before it wrote anything)."""
        fs, path = url_to_fs(self.url)
        if self.created and fs.exists(path):
            names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
            if names <= {OWNER_MARKER}:
                remove_owned(self.url, RUN_KIND)

    def write_config(self, cfg: Config) -> None:
        """Write the run's resolved ``config.yaml`` into the directory, ours (:meth:`own`)."""
        self.own()
        atomic_write_bytes(self.path("config.yaml"), cfg.to_yaml().encode())

    def write_metrics(self, metrics: dict) -> None:
        write_json(self.path("metrics.json"), metrics)
