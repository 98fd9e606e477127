"""Build the SparkSession the data jobs run on.

Driver memory comes from ``MQSA_SPARK_DRIVER_MEMORY`` (or Spark's own ``SPARK_DRIVER_MEMORY``),
default 4g; it only applies when this process starts the JVM (under ``spark-submit`` use
``--driver-memory``). Spark logs from the start of the JVM as ``log4j2.properties`` next to
this file says (or the file ``MQSA_SPARK_LOG4J`` names): no start-up banner, no per-host
warnings. Its log level is then ``MQSA_SPARK_LOG_LEVEL``, default FATAL, so the jobs' own
one-line progress is what the user sees and a failed task's JVM trace is not printed: the job
reports the failure's root cause in one line (:func:`spark_jobs.errors.root_cause`). Set it to
ERROR (or WARN, INFO) to see Spark's own log.
"""

from __future__ import annotations

import os
from pathlib import Path

from pyspark.sql import SparkSession

DEFAULT_DRIVER_MEMORY = "4g"
DEFAULT_LOG_LEVEL = "FATAL"
LOG4J_CONFIG = Path(__file__).with_name("log4j2.properties")


def driver_memory() -> str:
    """The driver memory to request: the environment's choice or the default."""
    return (
        os.environ.get("MQSA_SPARK_DRIVER_MEMORY")
        or os.environ.get("SPARK_DRIVER_MEMORY")
        or DEFAULT_DRIVER_MEMORY
    )


def log4j_option() -> str:
    """The driver JVM option that selects the log4j2 configuration (quiet by default)."""
    path = os.environ.get("MQSA_SPARK_LOG4J") or str(LOG4J_CONFIG)
    return f"-Dlog4j2.configurationFile={Path(path).resolve().as_uri()}"


def under_spark_submit() -> bool:
    """Whether this driver was started by ``spark-submit`` (which already chose the master)."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def build_session(master: str = "local[*]", app_name: str = "mqsa-ted-prepare") -> SparkSession:
    """Get or create a SparkSession on ``master`` tuned for the prepare job.

    Under ``spark-submit`` the submit command's master, driver memory and UI settings win and
    ``master`` is ignored.

    Adaptive query execution coalesces small shuffle partitions and splits skewed join
    partitions; aggregations over input already sorted by their keys run as one streaming sort
    aggregation (``replaceHashWithSortAgg``); ``spark.sql.shuffle.partitions`` is set per job
    by :func:`set_shuffle_partitions`.
    """
    builder = (
        SparkSession.builder.appName(app_name)
        .config("spark.sql.adaptive.enabled", "true")
        .config("spark.sql.adaptive.skewJoin.enabled", "true")
        .config("spark.sql.execution.replaceHashWithSortAgg", "true")
        .config("spark.sql.session.timeZone", "UTC")
    )
    if not under_spark_submit():
        builder = (
            builder.master(master)
            .config("spark.driver.memory", driver_memory())
            .config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false")
            .config("spark.driver.extraJavaOptions", log4j_option())
        )
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("MQSA_SPARK_LOG_LEVEL") or DEFAULT_LOG_LEVEL)
    return spark


def set_shuffle_partitions(spark: SparkSession, input_bytes: int | None) -> int:
    """Set ``spark.sql.shuffle.partitions`` to 2x the cores, or one per 64 MiB of input if more,
    unless the application's conf sets it (``--conf spark.sql.shuffle.partitions=...``).

    Returns the number in use. AQE later coalesces partitions that turn out small.
    """
    key = "spark.sql.shuffle.partitions"
    if spark.sparkContext.getConf().contains(key):
        return int(spark.conf.get(key))
    cores = spark.sparkContext.defaultParallelism
    by_size = (input_bytes or 0) // (64 << 20)
    partitions = max(2 * cores, int(by_size))
    spark.conf.set(key, str(partitions))
    return partitions
