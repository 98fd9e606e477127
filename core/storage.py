"""Reading and writing through fsspec URLs: clear errors, atomic writes, tensors without pickle.

Every file the project writes goes through :func:`atomic_write_bytes` (a temporary sibling
renamed over the target), so a crash leaves the old file or the whole new one, never half of
one; a failed write names the path and the OS error (``No space left on device``...).
"""

from __future__ import annotations

import io
import json
import os
import uuid
from typing import Any

import fsspec

from core.errors import StorageError


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and path of ``url``; a clear error if its backend is missing
    (e.g. ``s3://`` without s3fs: install the ``cloud`` extra)."""
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StorageError(f"cannot open {url}: {first}") from e


def protocol_of(fs: fsspec.AbstractFileSystem) -> str:
    """The main protocol name of ``fs`` (``file``, ``s3``, ``memory``...)."""
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def is_local(url: str) -> bool:
    """Whether ``url`` is on the local filesystem (a plain path or ``file://``)."""
    return protocol_of(url_to_fs(url)[0]) in ("file", "local")


def full_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """``path`` of ``fs`` as a URL that fsspec opens again (plain path for local files)."""
    return path if protocol_of(fs) in ("file", "local") else fs.unstrip_protocol(path)


def parquet_files(url: str) -> list[str]:
    """Sorted Parquet data files (URLs) under the directory ``url`` (names starting with ``_``
    or ``.`` are not data); raises :class:`StorageError` when there are none."""
    fs, path = url_to_fs(url)
    if not fs.exists(path):
        raise StorageError(f"{url} does not exist")
    files = sorted(
        p for p in fs.find(path) if p.endswith(".parquet") and p.rsplit("/", 1)[-1][0] not in "_."
    )
    if not files:
        raise StorageError(f"{url} holds no Parquet files")
    return [full_url(fs, p) for p in files]


def read_parquet(url: str, columns: list[str], filter=None):
    """The ``columns`` of every Parquet file under ``url`` as one Arrow table (``filter``: a
    pyarrow dataset expression applied while reading)."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    fs, _ = url_to_fs(url)
    paths = [url_to_fs(f)[1] for f in parquet_files(url)]
    try:
        return pads.dataset(paths, format="parquet", filesystem=fs).to_table(
            columns=columns, filter=filter
        )
    except (KeyError, ValueError, pa.ArrowInvalid) as e:
        raise StorageError(f"{url}: cannot read columns {columns}: {e}") from e


def atomic_write_bytes(url: str, payload: bytes) -> None:
    """Write ``payload`` to ``url`` so readers see the old file or the whole new one, never half.

    Writes a temporary sibling and renames it over the target (atomic on local filesystems and
    HDFS; object stores commit a single PUT atomically). Raises :class:`StorageError` naming the
    path and the OS error when the write fails (the temporary file is removed).
    """
    fs, path = url_to_fs(url)
    parent = os.path.dirname(path)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        if parent:
            fs.makedirs(parent, exist_ok=True)
        with fs.open(tmp, "wb") as f:
            f.write(payload)
        fs.mv(tmp, path)
    except OSError as e:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise StorageError(f"cannot write {url}: {e.strerror or e}") from e


def write_json(url: str, obj: Any) -> None:
    atomic_write_bytes(url, json.dumps(obj, indent=2).encode())


def read_json(url: str) -> Any:
    fs, path = url_to_fs(url)
    with fs.open(path, "r") as f:
        return json.load(f)


def save_state(url: str, state: dict) -> None:
    """``torch.save`` a dict of tensors and plain values atomically (loadable with
    ``weights_only=True``)."""
    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(url, buffer.getvalue())


def load_state(url: str) -> dict:
    """Load a file written by :func:`save_state` with ``weights_only=True``: tensors and plain
    containers only, nothing in the file can run code."""
    import torch

    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as f:
        return torch.load(io.BytesIO(f.read()), weights_only=True, map_location="cpu")
