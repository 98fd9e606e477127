"""The run directory: resolved config, ``metrics.json`` and model weights, written atomically."""

from __future__ import annotations

from core.config import Config
from core.storage import atomic_write_bytes, write_json


class RunDir:
    """``<run_dir>/config.yaml``, ``metrics.json``, ``model.pt`` (best-validation weights)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def path(self, name: str) -> str:
        return f"{self.url}/{name}"

    def write_config(self, cfg: Config) -> None:
        atomic_write_bytes(self.path("config.yaml"), cfg.to_yaml().encode())

    def write_metrics(self, metrics: dict) -> None:
        write_json(self.path("metrics.json"), metrics)
