"""URLs, staging and atomic commits for the data jobs, and readers for their outputs.

Which URLs Spark's executors read and write themselves, and which are staged through the driver
(:func:`route`): local paths and ``file://`` always go straight to Spark; a Hadoop scheme
(``hdfs://``, ``viewfs://``, ``s3a://``, ``gs://``, ``abfs(s)://``, ``wasb(s)://``; ``s3://`` and
``s3n://`` are read as ``s3a://``, ``gcs://`` as ``gs://``) does too when the session's JVM has
a Hadoop ``FileSystem`` for it (``s3a`` needs the hadoop-aws jars, ``gs`` the GCS connector:
the pip ``pyspark`` ships neither). Everything else (``memory://`` in the tests, ``http(s)://``,
``s3://`` without hadoop-aws, ...) is staged through the driver with fsspec: an input is copied
to a local temporary directory, outputs are written locally and uploaded.

Commit protocol of an output directory ``D``: the leftovers of dead runs on ``D`` are swept and
the run takes a lock (:mod:`spark_jobs.ownership`); everything is written into a hidden sibling
``.D.staging-<token>`` that first gets our ownership marker; the marker file ``_COMPLETE`` is
written there last; then the sibling is renamed to ``D`` (a previous ``D``, only if it carries
our marker of the same kind, is first renamed aside and deleted afterwards). On a local disk or
HDFS the rename is atomic; on object stores a rename is a copy, so readers must check
``_COMPLETE`` (the readers of :mod:`mqsa_core.prepared` do).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fsspec.utils import get_protocol
from py4j.protocol import Py4JJavaError

from mqsa_core.lease import Lease
from mqsa_core.prepared import COMPLETE_MARKER, is_data_file
from mqsa_core.storage import StorageError, full_url, url_to_fs
from spark_jobs.errors import PrepareError
from spark_jobs.ownership import OWNER_MARKER, RunLock, mark_owned, owned_kind, sweep

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

LOCAL_SCHEMES = {"file", "local"}
HADOOP_SCHEMES = {"hdfs", "viewfs", "s3a", "gs", "abfs", "abfss", "wasb", "wasbs"}
SPARK_ALIASES = {"s3": "s3a", "s3n": "s3a", "gcs": "gs"}


def hadoop_scheme(url: str) -> str | None:
    """The Hadoop scheme Spark would use for ``url`` (``file`` for a local path, ``s3a`` for
    ``s3://``...), or None for a URL that only fsspec opens (``memory://``, ``http://``...)."""
    protocol = get_protocol(url)
    if protocol in LOCAL_SCHEMES:
        return "file"
    protocol = SPARK_ALIASES.get(protocol, protocol)
    return protocol if protocol in HADOOP_SCHEMES else None


def to_spark_url(url: str) -> str:
    """``url`` as Spark's Hadoop layer names it (``s3://`` becomes ``s3a://``)."""
    protocol = get_protocol(url)
    if protocol in SPARK_ALIASES and url.startswith(protocol + "://"):
        return SPARK_ALIASES[protocol] + url[len(protocol) :]
    return url


def spark_filesystem(spark: SparkSession, scheme: str) -> str | None:
    """The class name of the Hadoop ``FileSystem`` the session's JVM has for ``scheme``
    (``FileSystem.getFileSystemClass`` through the session's gateway), or None when it has none
    (``s3a`` without the hadoop-aws jars, ``gs`` without the GCS connector)."""
    context = spark.sparkContext
    filesystem = context._jvm.org.apache.hadoop.fs.FileSystem
    try:
        found = filesystem.getFileSystemClass(scheme, context._jsc.hadoopConfiguration())
    except Py4JJavaError:
        return None
    return str(found.getName())


@dataclass(frozen=True)
class Route:
    """How the job reaches a URL: ``spark_url`` is what the executors read and write, or None
    when the data is staged through the driver; ``why`` is said in the progress line."""

    spark_url: str | None
    why: str

    def __str__(self) -> str:
        return f"{'executors' if self.spark_url else 'staged via the driver'} ({self.why})"


def route(spark: SparkSession, url: str) -> Route:
    """Whether Spark's executors reach ``url`` themselves (module docstring): a local path
    always, a Hadoop scheme when the session has a ``FileSystem`` for it, nothing else."""
    scheme = hadoop_scheme(url)
    if scheme is None:
        return Route(None, f"{get_protocol(url)}:// is no Hadoop filesystem")
    if scheme == "file":
        return Route(url, "local")
    found = spark_filesystem(spark, scheme)
    if found is None:
        return Route(None, f"no Hadoop FileSystem for {scheme}:// on Spark's classpath")
    return Route(to_spark_url(url), f"{scheme}:// by {found.rsplit('.', 1)[-1]}")


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
def staged_input(url: str, spark: SparkSession) -> Iterator[str]:
    """Yield a URL the executors of ``spark`` read for ``url``: itself as Spark names it, or
    (staged through the driver, see :func:`route`) a local copy kept while in use."""
    direct = route(spark, url).spark_url
    if direct is not None:
        yield direct
        return
    fs, path = url_to_fs(url)
    local_root = tempfile.mkdtemp(prefix="mqsa-input-")
    try:
        local = f"{local_root}/{path.rstrip('/').rsplit('/', 1)[-1]}"
        fs.get(path, local, recursive=fs.isdir(path))
        yield local
    finally:
        shutil.rmtree(local_root, ignore_errors=True)


# the setting that names each kind of output, for the line that refuses a second job on it
LEASE_SETTINGS = {"prepared-data": "data.dir", "synthetic-events": "data.events"}


class OutputStaging:
    """A hidden sibling of an output directory that is renamed over it on :meth:`commit`.

    ``kind`` names what the directory holds (``prepared-data``, ``synthetic-events``): the
    staging directory carries the ownership marker of that kind, and an existing directory is
    only replaced when it carries the same marker (or is empty). Where the executors cannot
    reach ``url`` (:func:`route`), Spark writes into a local directory uploaded on commit.
    """

    def __init__(self, url: str, kind: str) -> None:
        self.url, self.kind = url, kind
        self.fs, self.path = url_to_fs(url)
        self.path = self.path.rstrip("/")
        self.parent, _, self.name = self.path.rpartition("/")
        if not self.name:
            raise PrepareError(f"output URL {url!r} names no directory")
        token = uuid.uuid4().hex[:12]
        self.staging = f"{self.parent}/.{self.name}.staging-{token}"
        self.aside = f"{self.parent}/.{self.name}.old-{token}"
        self.lock = RunLock(self.fs, f"{self.parent}/.{self.name}.lock-{token}")
        self.lease = Lease(url, kind, LEASE_SETTINGS.get(kind, "output path"))
        self.local: str | None = None
        self.swept: dict[str, int] = {}

    def start(self) -> None:
        """Take the output's lease (one job at a time: a second one is refused naming the
        first), sweep the leftovers of dead runs, check the target, lock, create the staging
        directory and mark it as ours."""
        self.lease.acquire()
        if self.lease.note:
            print(self.lease.note, file=sys.stderr, flush=True)
        self.swept = sweep(self.fs, self.parent, self.name, self.kind)
        self._check_target()
        self.lock.acquire()
        self.fs.makedirs(self.staging, exist_ok=True)
        mark_owned(full_url(self.fs, self.staging), self.kind)

    def _check_target(self) -> None:
        """Refuse to replace anything but an empty directory or one we wrote (our marker)."""
        if not self.fs.exists(self.path):
            return
        if not self.fs.isdir(self.path):
            raise PrepareError(f"output {self.url} exists and is a file; refusing to replace it")
        names = {p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path, detail=False)}
        kind = owned_kind(full_url(self.fs, self.path))
        if kind == self.kind or not names:
            return
        if kind is not None:
            why = f"it holds {kind} written by this project, not {self.kind}"
        elif COMPLETE_MARKER in names:
            why = (
                f"it has {COMPLETE_MARKER} but no {OWNER_MARKER} marker: an output of an earlier "
                "version, which cannot be told apart from a folder of yours"
            )
        else:
            why = f"it was not written by this job (no {OWNER_MARKER} marker)"
        raise PrepareError(
            f"refusing to replace the existing directory {self.url}: {why}; delete it yourself "
            "if nothing in it is needed, or choose another output path (data.dir)"
        )

    def spark_target(self, name: str, spark: SparkSession) -> str:
        """Where the executors of ``spark`` write the dataset ``name``: into the staging
        directory, or, when the output is staged via the driver (:func:`route`), into a local
        directory that :meth:`commit` uploads."""
        if self.local is None and route(spark, self.url).spark_url is None:
            self.local = tempfile.mkdtemp(prefix="mqsa-output-")
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
        """Upload local parts (without the ``.crc`` checksum files Hadoop writes next to local
        files: the store keeps its own), write ``_COMPLETE`` last, check the target once more
        (it may have changed since the start), then rename the staging directory over it."""
        if self.local is not None:
            for folder, _, names in os.walk(self.local):
                for name in names:
                    if name.endswith(".crc"):
                        os.remove(os.path.join(folder, name))
            for entry in sorted(os.listdir(self.local)):
                self.fs.put(f"{self.local}/{entry}", f"{self.staging}/{entry}", recursive=True)
        self.write_json(COMPLETE_MARKER, {"committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ")})
        self._check_target()
        replaced = self.fs.exists(self.path)
        if replaced:
            self.fs.mv(self.path, self.aside, recursive=True)
        self.fs.mv(self.staging, self.path, recursive=True)
        if replaced:
            self.fs.rm(self.aside, recursive=True)

    def cleanup(self) -> None:
        """Remove what is left of this run's staging directory and local temporary directory,
        then release the lock."""
        if self.local is not None:
            shutil.rmtree(self.local, ignore_errors=True)
        if self.fs.exists(self.staging):
            self.fs.rm(self.staging, recursive=True)
        self.lock.release()
        self.lease.release()


@contextmanager
def staged_output(url: str, kind: str) -> Iterator[OutputStaging]:
    """Yield a started :class:`OutputStaging` for ``url``; commit it if the block succeeds."""
    staging = OutputStaging(url, kind)
    try:
        staging.start()
        yield staging
        staging.commit()
    finally:
        staging.cleanup()
