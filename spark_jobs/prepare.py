"""The prepare job: raw event log -> vocab/, sequences/, transitions/ and stats.json.

    python -m spark_jobs.prepare CONFIG [section.key=value ...]

Reads ``data.events`` and writes under ``data.dir`` (committed atomically, see
:mod:`spark_jobs.io`). Stages, output contract and skew handling: docs/data_pipeline.md.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from contextlib import ExitStack
from typing import Any

from py4j.protocol import Py4JError
from pyspark import StorageLevel
from pyspark.errors import PySparkException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from mqsa_core.config import ConfigError, DataConfig, check_prepare, load_config
from mqsa_core.errors import UserError
from mqsa_core.prepared import NEW_TARGETS, STATS_FILE
from spark_jobs.clean import (
    ROW_REASONS,
    annotate,
    deduplicate,
    item_tally,
    kept_rows,
    tally_totals,
    unit_ranges,
    without_keys,
)
from spark_jobs.errors import PrepareError, root_cause
from spark_jobs.filters import kcore
from spark_jobs.incremental import (
    EVENT_REASONS,
    Base,
    add_decayed,
    base_stats,
    check_incremental,
    check_overlap,
    check_time_unit,
    classify,
    combine,
    extend_vocab,
    match_ids,
    new_item_tally,
    new_totals,
    read_base,
)
from spark_jobs.io import OutputStaging, route, staged_input, staged_output, total_size
from spark_jobs.progress import Progress
from spark_jobs.read import detect_format, list_input, read_events
from spark_jobs.sequences import (
    index_events,
    leave_one_out,
    sequence_counts,
    short_users,
    train_part,
    user_sequences,
)
from spark_jobs.session import build_session, set_shuffle_partitions
from spark_jobs.timestamps import check_units
from spark_jobs.transitions import count_transitions, top_successors
from spark_jobs.vocab import build_vocab, item_counts

TIE_BREAK = "timestamp, then input row order"
PREPARED_DATA = "prepared-data"  # the ownership marker's kind of a prepare output


def persisted(df: DataFrame) -> DataFrame:
    """``df`` cached in memory (spilling to disk): the job's reuse points."""
    return df.persist(StorageLevel.MEMORY_AND_DISK)


def write_parquet(df: DataFrame, path: str) -> None:
    """Write ``df`` as Parquet at ``path`` (a staging location)."""
    df.write.mode("overwrite").parquet(path)


class Job:
    """One run of the prepare job: the config, the session, the drop counts and progress."""

    def __init__(self, cfg: DataConfig, spark: SparkSession, progress: Progress) -> None:
        self.cfg = cfg
        self.spark = spark
        self.progress = progress
        self.dropped: dict[str, int] = dict.fromkeys(ROW_REASONS, 0)
        self.dropped.update(
            duplicate_events=0, base_duplicate_events=0, late_events=0,
            kcore_users=0, kcore_items=0, kcore_events=0, short_users=0, short_user_events=0,
            row_drop_items=0, late_items=0, short_user_items=0,
        )  # fmt: skip
        self.rows = 0
        self.items_read = 0
        self.time_units: dict[str, int] = {}
        self.time_unit: str | None = None
        self.incremental: dict[str, Any] = {}  # what stats.json records about the base

    def read(self, spark_url: str, fmt: str) -> tuple[DataFrame, DataFrame]:
        """The clean events (lazy) and their item counts, after one pass over the input that
        counts the rows, the row drops, the rows per item and the timestamps per unit (mixed
        units are refused, see :mod:`spark_jobs.timestamps`)."""
        cfg = self.cfg
        columns = {"user_col": cfg.user_col, "item_col": cfg.item_col, "time_col": cfg.time_col}
        with self.progress.stage("read") as info:
            raw = read_events(self.spark, cfg.events, spark_url, fmt, columns)
            annotated = annotate(raw, cfg.user_col, cfg.item_col, cfg.time_col, cfg.time_unit)
            tally = persisted(item_tally(annotated))
            totals = tally_totals(tally)
            self.rows, self.time_units, self.items_read = totals.rows, totals.units, totals.items
            if self.rows == 0:
                raise PrepareError(f"input is empty: no rows in {cfg.events}")
            self.time_unit = check_units(
                self.time_units, cfg.time_unit, cfg.time_col, lambda: unit_ranges(annotated)
            )
            self.dropped.update(totals.reasons, row_drop_items=totals.row_drop_items)
            info.update(format=fmt, rows=self.rows, dropped=sum(totals.reasons.values()))
            info.update(items=totals.items, row_drop_items=totals.row_drop_items)
            info.update(time_unit=self.time_unit)
        return kept_rows(annotated), tally.select("item_id", "count")

    def filter_events(self, events: DataFrame) -> DataFrame:
        """Deduplicate (if ``data.dedup``) and k-core filter (if ``data.kcore``) the events.

        Only called when one of them is on."""
        if self.cfg.dedup:
            with self.progress.stage("dedup") as info:
                events = persisted(deduplicate(events))
                unique = events.count()
                clean = self.rows - sum(self.dropped[r] for r in ROW_REASONS)
                self.dropped["duplicate_events"] = clean - unique
                info.update(duplicates=self.dropped["duplicate_events"])
        if self.cfg.kcore > 0:
            with self.progress.stage("kcore") as info:
                events, removed, rounds = kcore(events, self.cfg.kcore)
                self.dropped.update(removed)
                info.update(k=self.cfg.kcore, rounds=rounds, **removed)
        return events

    def _user_sequences(
        self, events: DataFrame, vocab: DataFrame, num_items: int, partitions: int
    ) -> DataFrame:
        """The per-user sequences of ``events`` in vocab indices (persisted, lazy)."""
        indexed = index_events(events, vocab, num_items)
        return persisted(user_sequences(indexed, partitions))

    def sequences(
        self, events: DataFrame, counts: DataFrame
    ) -> tuple[DataFrame, int, DataFrame, dict[str, int]]:
        """Vocab, its size, the per-user sequences (persisted) and their counts; short users
        dropped.

        The vocab is first built from ``counts`` (the item counts of all ``events``); if some
        users turn out to have fewer than 3 events they are removed, and vocab and sequences
        are built once more; the items that lose all their events with them are counted
        (``short_user_items``).
        """
        partitions = user_partitions(self.spark, self.cfg.num_files)
        with self.progress.stage("vocab") as info:
            vocab, num_items = build_vocab(counts)
            info.update(items=num_items)
        with self.progress.stage("sequences") as info:
            seqs = self._user_sequences(events, vocab, num_items, partitions)
            sizes = sequence_counts(seqs)
            if sizes["short_users"]:
                for key in ("short_users", "short_user_events"):
                    self.dropped[key] = sizes[key]
                events = without_keys(events, "user", short_users(seqs))
                vocab, kept_items = build_vocab(item_counts(events))
                self.dropped["short_user_items"] = num_items - kept_items
                num_items = kept_items
                rebuilt = self._user_sequences(events, vocab, num_items, partitions)
                sizes = sequence_counts(rebuilt)
                seqs.unpersist()
                seqs = rebuilt
            info.update(users=sizes["users"], events=sizes["events"], partitions=partitions)
            info.update(short_users=self.dropped["short_users"])
            info.update(short_user_items=self.dropped["short_user_items"], items=num_items)
        if num_items == 0:
            raise PrepareError(f"no events left in {self.cfg.events} after drops: {self.dropped}")
        return vocab, num_items, seqs, sizes

    def extend(self, events: DataFrame, base: Base) -> tuple[DataFrame, int, DataFrame, dict]:
        """Like :meth:`sequences` for an incremental run: the new events checked against the
        base (overlap, events it holds, late events, short new users; all counted), the
        base's vocab with the new items appended, and the per-user combined histories
        (persisted) with their ``pos`` arrays (:mod:`spark_jobs.incremental`)."""
        partitions = user_partitions(self.spark, self.cfg.num_files)
        check_time_unit(base, self.time_unit)
        with self.progress.stage("base") as info:
            classified = persisted(classify(match_ids(events, base), base))
            tally = persisted(new_item_tally(classified, base))
            totals = new_totals(tally, classified)
            check_overlap(totals, base, self.cfg.base_min_overlap)
            self.dropped.update({key: totals[key] for key in EVENT_REASONS})
            for key in ("short_users", "late_items", "short_user_items"):
                self.dropped[key] = totals[key]
            info.update(dir=base.url, items=totals["items"], known_items=totals["known_items"])
            info.update(users=totals["users"], known_users=totals["known_users"])
            info.update({key: totals[key] for key in EVENT_REASONS})
        with self.progress.stage("vocab") as info:
            counts = tally.filter(F.col("count") > 0).select("item_id", "count")
            vocab, num_items, new_items = extend_vocab(base, counts)
            info.update(base_items=int(base.stats["items"]), new_items=new_items)
            info.update(late_items=totals["late_items"])
            info.update(short_user_items=totals["short_user_items"], items=num_items)
        with self.progress.stage("sequences") as info:
            added = classified.filter(F.col("drop") == 0).select("user", "item", "ts", "seq")
            indexed = index_events(added, vocab, num_items)
            seqs = persisted(combine(base, user_sequences(indexed, partitions), partitions))
            sizes = sequence_counts(seqs)
            new_users = seqs.filter(F.col("new_user")).count()
            info.update(users=sizes["users"], events=sizes["events"], new_users=new_users)
            info.update(short_users=self.dropped["short_users"], partitions=partitions)
        self.incremental = {
            "sequence_columns": [NEW_TARGETS],  # leave_one_out adds it (seqs has pos)
            "new_users": new_users,
            "new_items": new_items,
            "new_events": sizes["events"] - int(base.stats["events"]),
            "transition_decay": self.cfg.transition_decay,
            "base": base.summary(),
            "overlap": {
                key: totals[key] for key in ("items", "known_items", "users", "known_users")
            },
        }
        return vocab, num_items, seqs, sizes

    def write(
        self,
        vocab: DataFrame,
        num_items: int,
        seqs: DataFrame,
        sizes: dict[str, int],
        out: OutputStaging,
        base: Base | None,
    ) -> dict[str, Any]:
        """Write vocab/, sequences/ and transitions/ (in an incremental run, the base's graph
        decayed plus the new pairs); returns the counts for stats.json."""
        cfg = self.cfg
        with self.progress.stage("write") as info:
            write_parquet(vocab, out.spark_target("vocab", self.spark))
            split = leave_one_out(seqs).coalesce(cfg.num_files)
            write_parquet(split, out.spark_target("sequences", self.spark))
            info.update(files=cfg.num_files)
        with self.progress.stage("transitions") as info:
            train = train_part(seqs, cfg.max_len if cfg.paper_mode else None)
            edges = count_transitions(train, cfg.time_span, cfg.max_time_gap)
            if base is not None:
                edges = add_decayed(base, edges, cfg.transition_decay)
            if cfg.top_k_successors > 0:
                edges = top_successors(edges, cfg.top_k_successors)
            target = out.spark_target("transitions", self.spark)
            write_parquet(edges, target)
            num_edges = self.spark.read.parquet(target).count()
            info.update(edges=num_edges, time_span=cfg.time_span, paper_mode=cfg.paper_mode)
        return {
            "users": sizes["users"],
            "items": num_items,
            "events": sizes["events"],
            "train_events": sizes["events"] - 2 * sizes["users"],
            "events_read": self.rows,
            "items_read": self.items_read,
            "dropped": self.dropped,
            "num_transitions": num_edges,
        }

    def stats(self, counts: dict[str, Any], fmt: str) -> dict[str, Any]:
        """``stats.json``: the counts plus the settings that shaped them."""
        cfg = self.cfg
        return {
            **counts,
            "max_len": cfg.max_len,
            "time_span": cfg.time_span,
            "paper_mode": cfg.paper_mode,
            "top_k_successors": cfg.top_k_successors,
            "max_time_gap": cfg.max_time_gap,
            "kcore": cfg.kcore,
            "dedup": cfg.dedup,
            "time_unit": cfg.time_unit,
            "time_unit_seen": self.time_unit,
            "timestamps_per_unit": self.time_units,
            "tie_break": TIE_BREAK,
            "source": cfg.events,
            "format": fmt,
            # this output's identity: a warm start checks that its data extends this version
            "version": uuid.uuid4().hex,
            **self.incremental,
        }


def user_partitions(spark: SparkSession, num_files: int) -> int:
    """Partitions of the by-user shuffle: the shuffle partitions rounded up to a multiple of
    ``num_files``, so sequences/ is written as ``num_files`` equal files without a shuffle."""
    shuffle = int(spark.conf.get("spark.sql.shuffle.partitions"))
    return num_files * max(1, -(-shuffle // num_files))


def prepare(
    cfg: DataConfig, spark: SparkSession | None = None, progress: Progress | None = None
) -> dict[str, Any]:
    """Run the whole job for ``cfg``; returns the stats written to ``stats.json``.

    Raises :class:`ConfigError` for impossible settings and :class:`PrepareError` for bad
    input, an output path that is not ours to replace, or a failed Spark job (its root cause
    in one line).

    Uses ``spark`` if given (its cached data is cleared at the end), else builds a session
    on ``cfg.spark_master``.
    """
    check_prepare(cfg)  # the config layer's rules (also for a DataConfig built in code)
    check_incremental(cfg)
    progress = progress or Progress()
    files = list_input(cfg.events)
    fmt = detect_format(cfg.events, cfg.format, files)
    base = base_stats(cfg) if cfg.base_dir else None
    with staged_output(cfg.dir, PREPARED_DATA) as out, ExitStack() as inputs:
        progress.note("output", dir=cfg.dir, **out.swept)
        spark = spark or build_session(cfg.spark_master)
        progress.note("io", events=route(spark, cfg.events), dir=route(spark, cfg.dir))
        spark_url = inputs.enter_context(staged_input(cfg.events, spark))
        base_url = None if base is None else inputs.enter_context(staged_input(cfg.base_dir, spark))
        set_shuffle_partitions(spark, total_size(cfg.events, files) if files else None)
        job = Job(cfg, spark, progress)
        try:
            events, counts = job.read(spark_url, fmt)
            if cfg.dedup or cfg.kcore > 0:
                events = job.filter_events(events)
                counts = item_counts(events)
            previous = None if base is None else read_base(spark, cfg.base_dir, base, base_url)
            if previous is None:
                vocab, num_items, seqs, sizes = job.sequences(events, counts)
            else:
                vocab, num_items, seqs, sizes = job.extend(events, previous)
            stats = job.stats(job.write(vocab, num_items, seqs, sizes, out, previous), fmt)
        except (PySparkException, Py4JError) as e:
            raise PrepareError(f"the Spark job failed on {cfg.events}: {root_cause(e)}") from e
        finally:
            spark.catalog.clearCache()
        out.write_json(STATS_FILE, stats)
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Prepare the MQSA-TED data with Spark.")
    parser.add_argument("config", help="experiment YAML (any fsspec URL)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    progress = Progress()
    try:
        cfg = load_config(args.config, args.overrides, fit=False)
        with progress.stage("total") as info:
            stats = prepare(cfg.data, progress=progress)
            info.update(users=stats["users"], items=stats["items"], out=cfg.data.dir)
    except (ConfigError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
