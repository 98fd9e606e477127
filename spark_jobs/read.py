"""Read the raw event log with Spark: format detection, column checks, clear errors."""

from __future__ import annotations

from pyspark.errors import PySparkException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

from spark_jobs.errors import PrepareError, root_cause
from spark_jobs.io import data_files, hadoop_scheme, has_backend

EXTENSIONS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
}
COMPRESSIONS = (".gz", ".bz2", ".zst", ".snappy", ".lz4", ".deflate")
CORRUPT_COLUMN = "_corrupt_record"


def format_of_name(name: str) -> str | None:
    """The format a file or directory name implies by its extension, if any."""
    lowered = name.rstrip("/").lower()
    for compression in COMPRESSIONS:
        if lowered.endswith(compression) and not lowered.endswith(".parquet"):
            lowered = lowered[: -len(compression)]
    for ext, fmt in EXTENSIONS.items():
        if lowered.endswith(ext):
            return fmt
    return None


def detect_format(url: str, fmt: str, files: list[str] | None) -> str:
    """``fmt`` unless it is ``auto``; else from the URL's extension or its data files' names."""
    if fmt != "auto":
        return fmt
    for name in [url, *(files or [])]:
        found = format_of_name(name)
        if found:
            return found
    raise PrepareError(
        f"cannot tell the format of {url} from its name; set data.format to parquet, csv or json"
    )


def list_input(url: str) -> list[str] | None:
    """The input's data files, or None where no fsspec backend can list them (Spark will).

    Raises :class:`PrepareError` if the input does not exist or holds no data.
    """
    if hadoop_scheme(url) is not None and not has_backend(url):
        return None  # e.g. s3a:// without s3fs installed: Spark lists it itself (if it can)
    files = data_files(url)
    if not files:
        raise PrepareError(f"input is empty: {url} holds no data files")
    return files


def load(spark: SparkSession, spark_url: str, fmt: str) -> DataFrame:
    """Spark's reader for ``fmt`` on ``spark_url``.

    CSV is read as RFC 4180 (a header, inferred types, fields quoted with ``"`` may hold
    commas and newlines, ``""`` inside them is one quote): ``multiLine`` reads each file
    whole in one task, so a big CSV log should be split into several files (or be Parquet).
    """
    reader = spark.read
    if fmt == "csv":
        options = {"header": True, "inferSchema": True, "multiLine": True, "quote": '"'}
        return reader.options(**options, escape='"').csv(spark_url)
    if fmt == "json":
        return reader.option("mode", "PERMISSIVE").json(spark_url)
    return reader.parquet(spark_url)


def check_columns(df: DataFrame, url: str, columns: dict[str, str]) -> None:
    """Raise a :class:`PrepareError` naming any missing or unusable column.

    ``columns`` maps the config key (``user_col``...) to the column name it names.
    """
    available = [c for c in df.columns if c != CORRUPT_COLUMN]
    if not available:
        if CORRUPT_COLUMN in df.columns:
            raise PrepareError(f"no row of {url} parses as JSON")
        raise PrepareError(f"input is empty: {url} has no columns")
    for key, name in columns.items():
        if name not in df.columns:
            raise PrepareError(
                f"column '{name}' (data.{key}) not found in {url}; "
                f"available columns: {', '.join(available)}"
            )
        dtype = df.schema[name].dataType
        if isinstance(dtype, T.StructType | T.ArrayType | T.MapType | T.BinaryType):
            raise PrepareError(
                f"column '{name}' (data.{key}) in {url} has type {dtype.simpleString()}; "
                "expected a string, number or timestamp"
            )


def read_events(
    spark: SparkSession, url: str, spark_url: str, fmt: str, columns: dict[str, str]
) -> DataFrame:
    """The raw event log at ``url`` (readable by Spark at ``spark_url``) with its columns checked.

    Keeps only the configured columns (plus Spark's corrupt-record column for JSON).
    """
    try:
        df = load(spark, spark_url, fmt)
        check_columns(df, url, columns)
    except PySparkException as e:
        raise PrepareError(f"cannot read {url} as {fmt}: {root_cause(e)}") from e
    keep = list(dict.fromkeys(columns.values()))
    if CORRUPT_COLUMN in df.columns:
        keep.append(CORRUPT_COLUMN)
    return df.select(*keep)
