"""Reading and writing through fsspec URLs: clear errors, atomic writes, tensors without pickle,
and deleting only what we created.

Every file the project writes goes through :func:`atomic_write_bytes` (a temporary sibling
renamed over the target), so a crash leaves the old file or the whole new one, never half of
one; a failed write names the path and the OS error (``No space left on device``...);
:func:`write_failure` does the same for writers we do not control (DeepSpeed, DCP).

Ownership: every directory the project creates gets an ``.mqsa-ted-owned`` marker (JSON: what
created it, when, where) before anything else is written into it (:func:`mark_owned`);
:func:`remove_owned` deletes a directory only if it holds that marker, so a mistyped path can
never make the project delete a directory it did not create.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import shutil
import socket
import sys
import uuid
from typing import Any

import fsspec

from mqsa_core.errors import StorageError

OWNER_MARKER = ".mqsa-ted-owned"
OWNER = "mqsa-ted"


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


def is_root(url: str) -> bool:
    """Whether ``url`` is a filesystem root (``/``, ``file:///``) or the root of a bucket or
    host (``s3://bucket/``, ``hdfs://namenode:8020``), or ``memory://``: never a place to write
    a run into or delete from. Local paths are made absolute first (``/tmp/..`` is ``/``)."""
    protocol, sep, rest = url.partition("://")
    if sep and protocol == "memory":
        return not rest.strip("/")
    if sep and protocol not in ("file", "local"):
        return "/" not in rest.strip("/")  # only a bucket or host name, or nothing
    path = rest if sep else url
    if sep and not path:
        return True
    absolute = os.path.abspath(path)
    return os.path.dirname(absolute) == absolute


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


def _marker_url(url: str) -> str:
    return f"{url.rstrip('/')}/{OWNER_MARKER}"


def owner_of(url: str) -> dict | None:
    """The ownership marker of the directory ``url`` (None when it holds none, or an unreadable
    one: then it is not ours)."""
    fs, path = url_to_fs(_marker_url(url))
    try:
        with fs.open(path, "r") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("owner") == OWNER else None


def is_owned(url: str, kind: str | None = None) -> bool:
    """Whether the directory ``url`` was created by this project (of ``kind``, if given)."""
    marker = owner_of(url)
    return marker is not None and (kind is None or marker.get("kind") == kind)


def mark_owned(url: str, kind: str, **details: Any) -> bool:
    """Create the directory ``url`` if needed and mark it as ours (``kind``: ``run``,
    ``checkpoints``, ``checkpoint``...; ``details`` are recorded in the marker).

    Call it before writing anything else into the directory. A directory that already exists
    keeps its marker; an existing one without a marker is marked only if it is empty (then it
    holds nothing to lose). Returns whether ``url`` is ours afterwards: False for a directory of
    someone else's files, which :func:`remove_owned` will then never delete.
    """
    if owner_of(url) is not None:
        return True
    fs, path = url_to_fs(url)
    if fs.exists(path) and fs.ls(path, detail=False):
        return False
    marker = {
        "owner": OWNER,
        "kind": kind,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "command": " ".join(sys.argv[:1]),
        **details,
    }
    write_json(_marker_url(url), marker)
    return True


def remove_owned(url: str, kind: str | None = None) -> None:
    """Delete the directory ``url`` and everything under it, only if it holds our marker (of
    ``kind``, if given); otherwise raise :class:`StorageError` and delete nothing.

    The marker goes last, so a directory half-deleted by a crash is still ours to finish."""
    if not is_owned(url, kind):
        what = f"an {OWNER_MARKER} marker" + (f" of kind {kind!r}" if kind else "")
        raise StorageError(f"refusing to delete {url}: it holds no {what} (not created by {OWNER})")
    fs, path = url_to_fs(url)
    marker = _marker_url(path)
    try:
        for child in fs.ls(path, detail=False):
            if child.rstrip("/") != marker:
                fs.rm(child, recursive=True)
        fs.rm(marker)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except OSError as e:
        raise StorageError(f"cannot delete {url}: {e.strerror or e}") from e


def _errors_in(error: BaseException) -> list[BaseException]:
    """``error``, its causes and contexts, and the per-rank failures a DCP
    ``CheckpointException`` carries (``failures: {rank: (exception, traceback)}``)."""
    found, todo = [], [error]
    while todo:
        e = todo.pop()
        if e is None or any(e is seen for seen in found):
            continue
        found.append(e)
        todo += [e.__cause__, e.__context__]
        for failure in getattr(e, "failures", {}).values():
            parts = failure if isinstance(failure, tuple) else (failure,)
            todo += [x for x in parts if isinstance(x, BaseException)]
    return found


def free_bytes(url: str) -> int | None:
    """Free bytes on the local filesystem holding ``url`` (its nearest existing ancestor);
    None for remote URLs."""
    if not is_local(url):
        return None
    path = os.path.abspath(url_to_fs(url)[1])
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def write_failure(url: str, error: BaseException) -> StorageError:
    """A :class:`StorageError` for a failed write under ``url`` by code we do not control
    (DeepSpeed, DCP): the OS error when one is in the chain, else the first line of the error;
    for a local ``url`` also the free space, and "no space left on device" when under 1 MiB is
    left (torch's C++ writer reports a full disk only as ``unexpected pos``)."""
    os_errors = [e for e in _errors_in(error) if isinstance(e, OSError) and e.strerror]
    text = str(error).strip()
    reason = (
        os_errors[0].strerror
        if os_errors
        else (text.splitlines()[0] if text else type(error).__name__)
    )
    free = free_bytes(url)
    if free is not None:
        if free < 1 << 20 and "space" not in reason.lower():
            reason = f"no space left on device ({reason})"
        reason += f"; {free / (1 << 20):.1f} MiB free there"
    return StorageError(f"cannot write {url}: {reason}")
