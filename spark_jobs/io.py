"""URLs, staging and atomic commits for the data jobs, and readers for their outputs.

Spark reads and writes local paths, ``file://`` and the Hadoop schemes (``hdfs://``,
``s3a://``, ``gs://``, ``abfs(s)://``; ``s3://`` is rewritten to ``s3a://``) directly. Any
other fsspec URL (``memory://`` in the tests, ``http(s)://``, ...) is copied to a local temporary
directory for reading, and outputs are written locally and uploaded through fsspec.

Commit protocol of an output directory ``D``: everything is written into a hidden sibling
``.D.staging-<token>``; the marker file ``_COMPLETE`` is written there last; then the sibling is
renamed to ``D`` (a previous ``D`` is first renamed aside and deleted afterwards). On a local
disk or HDFS the rename is atomic; on object stores a rename is a copy, so readers must check
``_COMPLETE`` (the readers of :mod:`core.prepared` do).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fsspec.utils import get_protocol

from core.prepared import COMPLETE_MARKER, STATS_FILE, is_data_file
from core.storage import StorageError, full_url, url_to_fs
from spark_jobs.errors import PrepareError

SPARK_SCHEMES = {"file", "hdfs", "viewfs", "s3a", "gs", "abfs", "abfss", "wasb", "wasbs"}
SPARK_ALIASES = {"s3": "s3a", "s3n": "s3a", "gcs": "gs"}


def spark_readable(url: str) -> bool:
    """Whether Spark can read and write ``url`` itself (local or a Hadoop filesystem)."""
    protocol = get_protocol(url)
    return protocol in SPARK_SCHEMES or protocol in SPARK_ALIASES


def to_spark_url(url: str) -> str:
    """``url`` as Spark's Hadoop layer names it (``s3://`` becomes ``s3a://``)."""
    protocol = get_protocol(url)
    if protocol in SPARK_ALIASES and url.startswith(protocol + "://"):
        return SPARK_ALIASES[protocol] + url[len(protocol) :]
    return url


def data_files(url: str) -> list[str]:
    """The data files at ``url`` (itself if a file), as fsspec paths, sorted by name."""
    fs, path = url_to_fs(url)
    if not fs.exists(path):
        raise PrepareError(f"input not found: {url}")
    if not fs.isdir(path):
        return [path]
    return sorted(p for p in fs.find(path) if is_data_file(p))


def has_backend(url: str) -> bool:
    """Whether fsspec can open ``url`` here (``s3a://`` needs s3fs, ``gs://`` gcsfs...)."""
    try:
        url_to_fs(url)
    except StorageError:
        return False
    return True


def total_size(url: str, files: list[str]) -> int:
    """Bytes in ``files`` (fsspec paths from :func:`data_files`) of ``url``'s filesystem."""
    fs, _ = url_to_fs(url)
    return sum(fs.size(p) for p in files)


@contextmanager
def staged_input(url: str) -> Iterator[str]:
    """Yield a URL Spark can read for ``url``: itself, or a local copy kept while in use."""
    if spark_readable(url):
        yield to_spark_url(url)
        return
    fs, path = url_to_fs(url)
    local_root = tempfile.mkdtemp(prefix="mqsa-input-")
    try:
        local = f"{local_root}/{path.rstrip('/').rsplit('/', 1)[-1]}"
        fs.get(path, local, recursive=fs.isdir(path))
        yield local
    finally:
        shutil.rmtree(local_root, ignore_errors=True)


class OutputStaging:
    """A hidden sibling of an output directory that is renamed over it on :meth:`commit`."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, self.path = url_to_fs(url)
        self.path = self.path.rstrip("/")
        parent, _, name = self.path.rpartition("/")
        if not name:
            raise PrepareError(f"output URL {url!r} names no directory")
        token = uuid.uuid4().hex[:12]
        self.staging = f"{parent}/.{name}.staging-{token}"
        self.aside = f"{parent}/.{name}.old-{token}"
        self.local = None if spark_readable(url) else tempfile.mkdtemp(prefix="mqsa-output-")
        self._check_target()
        self.fs.makedirs(self.staging, exist_ok=True)

    def _check_target(self) -> None:
        """Refuse to replace a directory that is not an earlier output of this job."""
        if not self.fs.exists(self.path):
            return
        if not self.fs.isdir(self.path):
            raise PrepareError(f"output {self.url} exists and is a file")
        names = {p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path, detail=False)}
        if names and not names & {COMPLETE_MARKER, STATS_FILE}:
            raise PrepareError(
                f"output {self.url} exists and is not a prepared-data directory "
                f"(no {COMPLETE_MARKER}); refusing to replace it"
            )

    def spark_target(self, name: str) -> str:
        """Where Spark writes the dataset ``name`` (a local directory for fsspec-only URLs)."""
        if self.local is not None:
            return f"{self.local}/{name}"
        return to_spark_url(full_url(self.fs, f"{self.staging}/{name}"))

    def open(self, name: str, mode: str = "wb") -> Any:
        """Open the file ``name`` of the staging directory through fsspec."""
        return self.fs.open(f"{self.staging}/{name}", mode)

    def write_json(self, name: str, payload: dict[str, Any]) -> None:
        """Write ``payload`` as the JSON file ``name`` into the staging directory."""
        with self.open(name, "w") as f:
            json.dump(payload, f, indent=1, sort_keys=False)
            f.write("\n")

    def commit(self) -> None:
        """Upload local parts, write ``_COMPLETE`` last, then rename the staging directory."""
        if self.local is not None:
            for entry in sorted(os.listdir(self.local)):
                self.fs.put(f"{self.local}/{entry}", f"{self.staging}/{entry}", recursive=True)
        self.write_json(COMPLETE_MARKER, {"committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ")})
        replaced = self.fs.exists(self.path)
        if replaced:
            self.fs.mv(self.path, self.aside, recursive=True)
        self.fs.mv(self.staging, self.path, recursive=True)
        if replaced:
            self.fs.rm(self.aside, recursive=True)

    def cleanup(self) -> None:
        """Remove what is left of the staging directory and the local temporary directory."""
        if self.local is not None:
            shutil.rmtree(self.local, ignore_errors=True)
        if self.fs.exists(self.staging):
            self.fs.rm(self.staging, recursive=True)


@contextmanager
def staged_output(url: str) -> Iterator[OutputStaging]:
    """Yield an :class:`OutputStaging` for ``url``; commit it if the block succeeds."""
    staging = OutputStaging(url)
    try:
        yield staging
        staging.commit()
    finally:
        staging.cleanup()
