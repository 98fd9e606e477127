"""``manifest.json`` of an export: what the vectors are and where they came from."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import fsspec

MANIFEST = "manifest.json"


class ExportError(ValueError):
    """An export cannot be written or read (missing run, unfinished export, mismatch)."""


@dataclass
class Manifest:
    dim: int
    count: int
    dtype: str
    metric: str
    max_len: int
    source_run: str
    checkpoint: str
    config_hash: str
    faiss: dict | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def read(cls, export_dir: str) -> Manifest:
        url = f"{export_dir.rstrip('/')}/{MANIFEST}"
        try:
            with fsspec.open(url, "r") as f:
                return cls(**json.load(f))
        except FileNotFoundError as e:
            raise ExportError(
                f"{url} not found: {export_dir} is not a finished export "
                "(run `python -m mqsa_ted.export RUN_DIR`)"
            ) from e
