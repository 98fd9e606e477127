"""The run directory: resolved config, ``metrics.json`` and model weights, written atomically."""

from __future__ import annotations

from core.config import Config
from core.storage import atomic_write_bytes, mark_owned, write_json

RUN_KIND = "run"


class RunDir:
    """``<run_dir>/config.yaml``, ``metrics.json``, ``model.pt`` (best-validation weights)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def path(self, name: str) -> str:
        return f"{self.url}/{name}"

    def write_config(self, cfg: Config) -> None:
        """The run's first write: marks the directory as ours when this run creates it (see
        ``core.storage.mark_owned``), then writes ``config.yaml``."""
        mark_owned(self.url, RUN_KIND)
        atomic_write_bytes(self.path("config.yaml"), cfg.to_yaml().encode())

    def write_metrics(self, metrics: dict) -> None:
        write_json(self.path("metrics.json"), metrics)
