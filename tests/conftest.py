"""Shared fixtures: one local Spark session for the whole test run, and prepare helpers."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyspark.sql import SparkSession

from mqsa_core.config import DataConfig
from mqsa_core.prepared import dataset_files
from spark_jobs.prepare import prepare
from spark_jobs.progress import Progress
from spark_jobs.session import build_session
from trainer.model import cpu_kernels

# This project's Intel machines run in VMs that hide avx512_bf16 from /proc/cpuinfo while their
# CPU executes it: probed in a child process, the kernel's tests then run there too.
if "avx512_bf16" not in cpu_kernels.cpu_flags() and cpu_kernels.executes_bf16_dot():
    os.environ[cpu_kernels.FLAGS_OVERRIDE] = "+avx512_bf16"


@pytest.fixture(scope="session")
def spark() -> Iterator[SparkSession]:
    session = build_session("local[2]", app_name="mqsa-ted-tests")
    yield session
    session.stop()


def read_output(data_dir: str, name: str) -> pa.Table:
    """One dataset (vocab, sequences, transitions) of a committed output, via fsspec."""
    tables = []
    for url in dataset_files(data_dir, name):
        with fsspec.open(url, "rb") as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables)


@pytest.fixture
def run_prepare(spark: SparkSession, tmp_path: Any) -> Callable[..., dict[str, Any]]:
    """``run_prepare(events_url, **data_keys)`` runs the job into ``tmp_path/out``."""

    def run(events: str, **keys: Any) -> dict[str, Any]:
        cfg = DataConfig(events=events, dir=str(tmp_path / "out"), num_files=2, **keys)
        return prepare(cfg, spark, Progress(log=lambda line: None))

    return run
