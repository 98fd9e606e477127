"""The export layout, its ``manifest.json`` and the checks every reader makes.

An export directory ``OUT`` holds versions; ``OUT/CURRENT`` names the one readers use::

    OUT/CURRENT                         {"version": ID, "manifest_sha256": ...}, written last
    OUT/versions/ID/_MQSA_EXPORT        ownership marker, written first
    OUT/versions/ID/items/part-RRRRR.parquet, user_encoder.pt, faiss.index (optional)
    OUT/versions/ID/manifest.json       shapes, model config, source run, every file's sha256

A version is written whole into its own directory, then ``CURRENT`` is replaced atomically (one
small object: a rename on local disks and HDFS, a single PUT on object stores; no directory
rename is needed), so a reader sees the old export or the new one, never a mix. Every file a
reader opens is named by the manifest with its sha256, and the manifest's sha256 is in
``CURRENT``: a stale or damaged file is refused, never served. Every name below ``OUT`` is read
as a plain file or directory of the export itself (:func:`read_inside`): a symbolic link
anywhere below ``OUT`` (``CURRENT``, ``versions/ID``, ``items/``, a part) is refused, so an
export never serves a file from outside its version directory.

Nothing read here executes code: JSON, Parquet, a FAISS index (its own binary format) and the
user encoder's tensors through ``torch.load(weights_only=True)`` (:func:`load_tensors`).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import os
import pickle
import re
import stat
from dataclasses import dataclass

from mqsa_core.config import EVAL_PROTOCOLS
from mqsa_core.errors import UserError
from mqsa_core.storage import is_local, url_to_fs

FORMAT = 2  # 1: one unversioned directory with a torch.export ``user_encoder.pt2`` (refused)
CURRENT = "CURRENT"
VERSIONS = "versions"
MANIFEST = "manifest.json"
OWNER_MARKER = "_MQSA_EXPORT"
ENCODER = "user_encoder.pt"
ADDED_ITEMS = "added_items.parquet"  # item_id, index of the rows new since the data's base
FAISS_INDEX = "faiss.index"
# model.transition_term: the train transition graph, src / dst rows and the term's feature
# log(1 + max(count - 1, 0)) per edge
TRANSITIONS = "transitions.parquet"
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*")


class ExportError(UserError):
    """An export cannot be written or read (missing run, unfinished export, mismatch)."""


class MissingExportError(ExportError):
    """No committed export at the URL (``CURRENT`` is absent)."""


@dataclass
class Source:
    """The training an export comes from: ``model_sha256`` identifies the weights."""

    run: str  # the run directory ("" when unknown: the staleness check is skipped)
    checkpoint: str  # <run>/model.pt
    model_sha256: str
    model_mtime: float
    best_epoch: int | None
    config_hash: str


@dataclass
class Manifest:
    dim: int
    count: int
    dtype: str
    metric: str
    max_len: int
    model: dict  # the run's ``model`` config section: rebuilds trainer.model.encoder.MQSAEncoder
    eval_protocol: str  # paper: recommend excludes the history | repeat_aware: it does not
    source: Source
    parts: list[str]  # item parts in row order, relative to the version directory
    files: dict[str, dict]  # relative name -> {"sha256", "bytes"} of every file readers open
    # {"kind", "build_seconds", "recall@10", "search" ({"nprobe": n} or {"efSearch": n}: what
    # recommend sets before searching; {} for an exact index), and "recall@100",
    # "target_recall", "tune_queries" when it was tuned on users' queries}; None: no index file
    faiss: dict | None = None
    # the prepared data's lineage: {"dir", "version", "items", "extends" (the base data's
    # version or None), "base_items", "added" (ADDED_ITEMS or None)}: rows keep their meaning
    # across versions that extend each other (data.base_dir)
    data: dict | None = None
    version: str = ""
    format: int = FORMAT

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: object, url: str) -> Manifest:
        """Check the keys and the names of ``raw`` (parsed JSON) and build the manifest."""
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ExportError(
                f"{url} is not a format-{FORMAT} export manifest (exports written before "
                "versioning held a torch.export user_encoder.pt2, which is never loaded: "
                "torch.export.load can unpickle code); re-run `mqsa-ted export RUN_DIR`"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        source_fields = {f.name for f in dataclasses.fields(Source)}
        source = raw.get("source")
        if set(raw) != fields or not isinstance(source, dict) or set(source) != source_fields:
            raise ExportError(f"{url}: unexpected manifest keys {sorted(set(raw) ^ fields)}")
        manifest = cls(**{**raw, "source": Source(**source)})
        sizes = (manifest.dim, manifest.count, manifest.max_len)
        if not all(isinstance(n, int) and n >= 0 for n in sizes) or manifest.dim == 0:
            raise ExportError(f"{url}: dim, count and max_len must be integers, dim > 0")
        if manifest.eval_protocol not in EVAL_PROTOCOLS or not all(
            isinstance(getattr(manifest.source, key), str) for key in ("run", "model_sha256")
        ):
            raise ExportError(f"{url}: unknown eval_protocol or a malformed source")
        if not (
            isinstance(manifest.parts, list)
            and all(isinstance(n, str) for n in manifest.parts)
            and isinstance(manifest.files, dict)
            and set(manifest.parts) <= set(manifest.files)
            and all(isinstance(n, str) and SAFE_NAME.fullmatch(n) for n in manifest.files)
            and all(isinstance(e, dict) and "sha256" in e for e in manifest.files.values())
        ):
            raise ExportError(f"{url}: files outside the version directory, unlisted or unhashed")
        return manifest


SEARCH_PARAMETERS = ("nprobe", "efSearch")  # IVF lists probed, HNSW candidate list length


def apply_search(index, search: object, url: str) -> None:
    """Set ``search`` (the manifest's ``faiss["search"]``: parameter name -> positive int) on the
    FAISS ``index``; a name outside :data:`SEARCH_PARAMETERS`, a value that is no positive
    integer or a parameter the index lacks raises :class:`ExportError` (``url``: the index)."""
    import faiss

    if not isinstance(search, dict):
        raise ExportError(f"{url}: the manifest's faiss search parameters are not a mapping")
    for name, value in search.items():
        if name not in SEARCH_PARAMETERS or type(value) is not int or value < 1:
            raise ExportError(f"{url}: unknown search parameter {name}={value!r} (known: "
                              f"{', '.join(SEARCH_PARAMETERS)}, positive integers)")  # fmt: skip
        try:
            faiss.ParameterSpace().set_index_parameter(index, name, value)
        except RuntimeError as e:
            raise ExportError(f"{url}: the index has no search parameter {name}") from e


def sha256_of(url: str, block: int = 1 << 23) -> tuple[str, int]:
    """``(hex sha256, size in bytes)`` of the file at ``url``, read ``block`` bytes at a time."""
    fs, path = url_to_fs(url)
    digest, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


LINK_REFUSED = "an export is read only from its own files, never through a link"


def _open_below(directory: int, name: str, shown: str, want_directory: bool) -> int:
    """``name`` in the open ``directory`` opened without following a link (``shown``: its URL
    for messages). A missing name raises :class:`FileNotFoundError`, anything else that is not
    the directory or regular file asked for raises :class:`ExportError`."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK  # O_NONBLOCK: a FIFO cannot hang us
    try:
        fd = os.open(name, flags | (os.O_DIRECTORY if want_directory else 0), dir_fd=directory)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR) and stat.S_ISLNK(
            os.stat(name, dir_fd=directory, follow_symlinks=False).st_mode
        ):
            raise ExportError(f"{shown} is a symbolic link: {LINK_REFUSED}") from e
        raise ExportError(f"cannot read {shown}: {e.strerror}") from e
    kind = os.fstat(fd).st_mode
    if not (stat.S_ISDIR(kind) if want_directory else stat.S_ISREG(kind)):
        os.close(fd)
        raise ExportError(f"{shown} is not a {'directory' if want_directory else 'regular file'}")
    return fd


def read_inside(root: str, relative: str) -> bytes:
    """The bytes of ``<root>/<relative>`` where every name below ``root`` is a plain directory or
    file of its own: a symbolic link anywhere on the way (or a special file) raises
    :class:`ExportError`; a missing name raises :class:`FileNotFoundError`. ``root`` itself may
    be a link (the user named it). Local paths are walked one directory descriptor at a time with
    ``O_NOFOLLOW``, so a link swapped in after a check is refused too; object stores hold no
    links."""
    if not is_local(root):
        fs, path = url_to_fs(f"{root.rstrip('/')}/{relative}")
        return fs.cat_file(path)
    shown = root.rstrip("/")
    try:
        fd = os.open(url_to_fs(root)[1], os.O_RDONLY | os.O_DIRECTORY)
    except NotADirectoryError as e:
        raise ExportError(f"{shown} is not a directory") from e
    names = relative.split("/")
    try:
        for depth, name in enumerate(names, 1):
            shown = f"{shown}/{name}"
            child = _open_below(fd, name, shown, want_directory=depth < len(names))
            os.close(fd)
            fd = child
        with os.fdopen(fd, "rb") as f:
            fd = -1  # closed by the file object
            return f.read()
    finally:
        if fd >= 0:
            os.close(fd)


def in_version(version_url: str, name: str) -> tuple[str, str]:
    """``(export root, path below it)`` of ``name`` in a version (``<root>/versions/<ID>``)."""
    root, versions, version = version_url.rsplit("/", 2)
    return root, f"{versions}/{version}/{name}"


def is_link(url: str) -> bool:
    """Whether ``url`` is a symbolic link (never on an object store)."""
    return is_local(url) and os.path.islink(url_to_fs(url)[1])


def read_checked(version_url: str, name: str, manifest: Manifest) -> bytes:
    """The bytes of ``name`` in a version, refused unless they match the manifest's sha256 and
    were read from the version's own files (:func:`read_inside`)."""
    payload = read_inside(*in_version(version_url, name))
    want = manifest.files.get(name, {}).get("sha256")
    if hashlib.sha256(payload).hexdigest() != want:
        url = f"{version_url}/{name}"
        raise ExportError(f"{url} does not match the sha256 in its manifest (damaged or replaced)")
    return payload


def load_tensors(payload: bytes, url: str, remedy: str) -> dict:
    """The tensors and plain containers in ``payload`` (the bytes of ``url``), through
    ``torch.load(weights_only=True)``. A file that loader refuses (a pickle that could run code)
    raises :class:`ExportError` saying it was refused as unsafe (torch's own message, which
    suggests loading it unsafely, is not passed on), so does one that is no torch file;
    ``remedy`` ends both messages."""
    import warnings

    import torch

    try:
        with warnings.catch_warnings():  # a crafted pickle's protocol: refused just below
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:  # the weights-only loader refused what the file holds
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        held = f"a reference to {found[1]}" if found else "more than tensors and plain containers"
        raise ExportError(
            f"{url} was refused as unsafe: it is not a weights-only tensor file (it holds "
            f"{held}, and loading that could run code), so it is never loaded; {remedy}"
        ) from e
    except Exception as e:  # not a torch.save file: a zip, truncated, empty, other bytes
        raise ExportError(f"{url} is not a torch tensor file (damaged or truncated? "
                          f"{type(e).__name__}); {remedy}") from e  # fmt: skip
    if not isinstance(state, dict):
        raise ExportError(f"{url} holds a {type(state).__name__}, not tensors by name; {remedy}")
    return state


def resolve_version(export_url: str) -> tuple[str, str]:
    """``(version URL, manifest sha256)`` that ``<export_url>/CURRENT`` names."""
    root = export_url.rstrip("/")
    try:
        payload = read_inside(root, CURRENT)
    except FileNotFoundError:
        fs, path = url_to_fs(f"{root}/{MANIFEST}")
        old = fs.exists(path)
        raise MissingExportError(
            f"{root} holds no committed export (no {CURRENT}"
            + ("; its manifest.json is from an older export format" if old else "")
            + "): run `mqsa-ted export RUN_DIR --out "
            + f"{root}` first"
        ) from None
    try:
        pointer = json.loads(payload)
    except ValueError:
        pointer = None
    version = pointer.get("version") if isinstance(pointer, dict) else None
    if not isinstance(version, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", version):
        raise ExportError(f"{root}/{CURRENT} does not name a version: damaged, re-run export")
    return f"{root}/{VERSIONS}/{version}", str(pointer.get("manifest_sha256"))


def read_manifest(export_url: str) -> tuple[str, Manifest]:
    """``(version URL, manifest)`` of the committed export at ``export_url``, checked against
    the sha256 that ``CURRENT`` records."""
    version_url, digest = resolve_version(export_url)
    url = f"{version_url}/{MANIFEST}"
    try:
        payload = read_inside(*in_version(version_url, MANIFEST))
    except FileNotFoundError as e:
        raise ExportError(f"{url} not found: {CURRENT} names a missing version") from e
    if hashlib.sha256(payload).hexdigest() != digest:
        raise ExportError(f"{url} does not match the sha256 in {CURRENT} (damaged or replaced)")
    try:
        raw = json.loads(payload)
    except ValueError as e:
        raise ExportError(f"{url} is not JSON: {e}") from e
    return version_url, Manifest.from_dict(raw, url)


def check_fresh(manifest: Manifest, run_dir: str | None, export_url: str) -> None:
    """Refuse an export whose weights are not the run's current ``model.pt``.

    ``run_dir``: the run to compare with; None = the manifest's source run, and then the check
    is skipped when that run is not readable here (an export copied elsewhere).
    """
    known = run_dir is not None
    run = (run_dir if known else manifest.source.run).rstrip("/")
    if not run:
        return
    checkpoint = f"{run}/model.pt"
    fs, path = url_to_fs(checkpoint)
    if not fs.exists(path):
        if known:
            raise ExportError(f"{checkpoint} not found: has the run finished?")
        return
    digest, _ = sha256_of(checkpoint)
    if digest != manifest.source.model_sha256:
        raise ExportError(
            f"{export_url} was exported from an older {checkpoint} (sha256 "
            f"{manifest.source.model_sha256[:12]}, epoch {manifest.source.best_epoch}; now "
            f"{digest[:12]}): re-run `mqsa-ted export {run} --out {export_url}`, "
            "or pass --allow-stale to use the old export"
        )
