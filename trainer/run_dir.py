"""The run directory: resolved config, ``metrics.json`` and model weights, written atomically."""

from __future__ import annotations

import io
import json
import os
import uuid

import fsspec
import torch

from trainer.config import Config


def atomic_write_bytes(url: str, payload: bytes) -> None:
    """Write ``payload`` to ``url`` so readers see the old file or the whole new one, never half.

    Writes a temporary sibling and renames it over the target (atomic on local filesystems and
    HDFS; object stores commit a single PUT atomically).
    """
    fs, path = fsspec.core.url_to_fs(url)
    parent = os.path.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "wb") as f:
        f.write(payload)
    fs.mv(tmp, path)


def write_json(url: str, obj: object) -> None:
    atomic_write_bytes(url, json.dumps(obj, indent=2).encode())


def save_state(url: str, state: dict) -> None:
    """``torch.save`` a dict of tensors/plain values atomically (loadable with weights_only)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(url, buffer.getvalue())


def load_state(url: str) -> dict:
    """Load a file written by ``save_state`` (``weights_only=True``: no pickle of code)."""
    with fsspec.open(url, "rb") as f:
        return torch.load(io.BytesIO(f.read()), weights_only=True, map_location="cpu")


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
