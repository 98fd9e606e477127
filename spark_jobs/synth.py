"""Seeded synthetic event logs with planted structure, in several kinds.

    python -m spark_jobs.synth --out URL --events N [--users U] [--items I] [--seed S]
                               [--kind KIND] [--format parquet|csv|json] [--time seconds|iso]

Every kind shares the catalogue: item popularity is Zipf(-Mandelbrot)-distributed (long tail)
and items belong to taste clusters. What decides the next item differs by ``--kind``:

- ``latent`` (default): every user has a taste cluster and vector; the first item comes from the
  user's cluster (80%) or the catalogue; then, with probability 0.7, the next item is picked
  among a few dozen popularity-drawn candidates (half from the previous item's cluster, half
  from the user's) with probability ``exp(kappa * (latent[prev] + taste) . latent[candidate])``,
  otherwise it is a fresh taste draw.
- ``series`` (the main job's demo): each cluster's items form a series in a fixed order (a ring);
  every user follows ``tastes`` (2) series and interleaves them at random, each step moving 1-3
  items on in the chosen series from where the user left it (10%: a popular item of one of the
  user's series instead). The next item depends on the user's taste and on the last item of
  the chosen series, which is often two or more steps back: a last-item counter only sees the
  current series and can predict about half the steps; a sequence model can predict both.
- ``markov``: every item has ``fanout`` (3) fixed successors; the next item is one of them
  (weights 0.6/0.3/0.1) with probability 0.85, else a popularity draw. A last-item counter is
  close to optimal.
- ``taste``: every user has ``tastes`` (2) clusters; each item is a popularity draw from one of
  them (10%: from the catalogue); the order carries no information. A last-item counter knows
  only the last item's cluster.
- ``mixture``: each step is a ``markov`` step or a ``taste`` step with probability 1/2.
- ``longtail``: ``mixture`` on a catalogue of many rare items (default items = events / 10,
  steeper Zipf, successors drawn by popularity).

Ids are strings ("u000123", "i004567"); timestamps are int64 seconds (``--time iso``: ISO-8601
strings, for CSV and JSON), strictly increasing within a user. Every user has at least 3 events
and the total is exactly N.

Events are generated in chunks of about 2^20 with numpy (seeded per chunk, so the output
depends only on the arguments) and written as one file per chunk through fsspec, so memory
stays fixed whatever N is. The directory is committed atomically like the prepare outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from spark_jobs.errors import PrepareError
from spark_jobs.io import OutputStaging, staged_output

CHUNK_EVENTS = 1 << 20
BASE_TIME = 1_600_000_000  # 2020-09-13, seconds
KINDS = ("latent", "series", "markov", "taste", "mixture", "longtail")
SERIES_STEPS = np.array([0.6, 0.9, 1.0])  # cumulative P(move 1, 2, 3 items on in a series)
SUCCESSOR_WEIGHTS = np.array([0.6, 0.9, 1.0])  # cumulative P(1st, 2nd, 3rd successor)


@dataclass(frozen=True)
class SynthSpec:
    """What to generate. ``users`` / ``items`` of 0 pick defaults from ``events``."""

    events: int
    users: int = 0
    items: int = 0
    seed: int = 0
    kind: str = "latent"
    clusters: int = 16
    candidates: int = 32
    latent_dim: int = 16
    kappa: float = 4.0
    p_transition: float = 0.7
    p_cluster: float = 0.8
    zipf_a: float = 1.1
    zipf_q: float = 10.0
    tastes: int = 2  # clusters (series) per user: series, taste, mixture, longtail
    p_noise: float = 0.1  # series / taste: share of steps that are plain popularity draws
    p_follow: float = 0.85  # markov: share of steps that follow a planted successor
    fanout: int = len(SUCCESSOR_WEIGHTS)  # markov: planted successors per item

    def resolved(self) -> SynthSpec:
        """The spec with default sizes filled in and checked."""
        if self.kind not in KINDS:
            raise PrepareError(f"unknown kind '{self.kind}'; choose one of {', '.join(KINDS)}")
        users = self.users or max(1, self.events // 20)
        longtail = self.kind == "longtail"
        items = self.items or max(10, self.events // (10 if longtail else 100))
        if self.events < 3 * users:
            raise PrepareError(f"--events {self.events} < 3 x --users {users}: each user needs 3")
        if self.kind != "latent" and items < 2 * self.clusters:
            raise PrepareError(f"--items {items} < 2 x {self.clusters} clusters")
        zipf = {"zipf_a": 1.3, "zipf_q": 1.0} if longtail else {}
        return dataclasses.replace(
            self, users=users, items=items, clusters=min(self.clusters, items), **zipf
        )


def sorted_search(cdf: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """``np.searchsorted(cdf, keys, side="right")``, the keys searched in sorted order: each
    search then starts where the previous one ended, in cache (x6 at 16 million items)."""
    order = np.argsort(keys)
    found = np.empty(len(keys), dtype=np.intp)
    found[order] = np.searchsorted(cdf, keys[order], side="right")
    return found


@dataclass(frozen=True)
class World:
    """The planted structure: popularity, clusters, latent item vectors, series and successors."""

    global_items: np.ndarray  # items in popularity order
    global_cdf: np.ndarray  # cumulative popularity along global_items
    cluster_items: np.ndarray  # items grouped by cluster, popularity order inside
    cluster_cdf: np.ndarray  # cluster id + cumulative popularity inside the cluster
    item_cluster: np.ndarray  # [items] cluster of each item
    centroids: np.ndarray  # [clusters, k] unit cluster centroids
    latent: np.ndarray  # [items, k] unit item vectors near their cluster's centroid
    series: np.ndarray  # items grouped by cluster, in series (ring) order inside
    series_start: np.ndarray  # [clusters] offset of each cluster's series in ``series``
    series_pos: np.ndarray  # [items] position of each item in its cluster's series
    successors: np.ndarray  # [items, fanout] planted successors (markov steps)

    def global_draw(self, u: np.ndarray) -> np.ndarray:
        """Items drawn by popularity (``u`` uniform in [0, 1))."""
        idx = sorted_search(self.global_cdf, u)
        return self.global_items[np.minimum(idx, len(self.global_items) - 1)]

    def cluster_draw(self, cluster: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Items drawn by popularity inside each ``cluster``."""
        idx = sorted_search(self.cluster_cdf, cluster + u)
        return self.cluster_items[np.minimum(idx, len(self.cluster_items) - 1)]

    def series_item(self, cluster: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """The item at position ``pos`` (modulo the series' length) of each ``cluster``'s series."""
        size = np.diff(np.r_[self.series_start, len(self.series)])[cluster]
        return self.series[self.series_start[cluster] + pos % size]


def build_world(spec: SynthSpec) -> World:
    """Draw the planted structure for ``spec`` (seeded)."""
    rng = np.random.default_rng([spec.seed, 2])
    n, c = spec.items, spec.clusters
    popularity = 1.0 / (np.arange(n) + spec.zipf_q) ** spec.zipf_a  # Zipf-Mandelbrot
    popularity /= popularity.sum()
    global_items = rng.permutation(n)
    item_cluster = np.empty(n, dtype=np.int64)
    item_cluster[global_items] = rng.permutation(n) % c
    rank_cluster = item_cluster[global_items]
    order = np.argsort(rank_cluster, kind="stable")
    cluster_items = global_items[order]
    weights = popularity[order]
    clusters = rank_cluster[order]
    totals = np.bincount(clusters, weights=weights, minlength=c)
    within = np.cumsum(weights) - np.concatenate([[0.0], np.cumsum(totals)[:-1]])[clusters]
    cluster_cdf = clusters + within / totals[clusters]
    last = np.r_[clusters[1:] != clusters[:-1], True]
    cluster_cdf[last] = clusters[last] + 1.0
    centroids = unit(rng.standard_normal((c, spec.latent_dim)))
    latent = unit(centroids[item_cluster] + 0.7 * unit(rng.standard_normal((n, spec.latent_dim))))
    # series and successors come from their own streams: the kinds above stay as they were
    series_rng, successor_rng = (
        np.random.default_rng([spec.seed, 3]),
        np.random.default_rng([spec.seed, 4]),
    )
    series = np.lexsort((series_rng.permutation(n), item_cluster))
    series_start = np.r_[0, np.cumsum(np.bincount(item_cluster, minlength=c))[:-1]]
    series_pos = np.empty(n, dtype=np.int64)
    series_pos[series] = np.arange(n) - series_start[item_cluster[series]]
    if spec.kind == "longtail":  # rare items stay rare: successors drawn by popularity
        cdf = np.cumsum(popularity)
        draws = np.searchsorted(cdf, successor_rng.random((n, spec.fanout)), side="right")
        successors = global_items[np.minimum(draws, n - 1)]
    else:
        successors = successor_rng.integers(0, n, size=(n, spec.fanout))
    return World(
        global_items=global_items,
        global_cdf=np.cumsum(popularity),
        cluster_items=cluster_items,
        cluster_cdf=cluster_cdf,
        item_cluster=item_cluster,
        centroids=centroids,
        latent=latent.astype(np.float32),
        series=series,
        series_start=series_start,
        series_pos=series_pos,
        successors=successors,
    )


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length."""
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def user_lengths(spec: SynthSpec) -> np.ndarray:
    """Events per user: 3 each plus a heavy-tailed (log-normal) share of the rest; sums to N."""
    rng = np.random.default_rng([spec.seed, 0])
    weights = rng.lognormal(0.0, 1.0, size=spec.users)
    extra = rng.multinomial(spec.events - 3 * spec.users, weights / weights.sum())
    return 3 + extra


def user_tastes(spec: SynthSpec, users: int, rng: np.random.Generator) -> np.ndarray:
    """``[users, tastes]`` distinct clusters per user."""
    tastes = min(spec.tastes, spec.clusters)
    return np.argsort(rng.random((users, spec.clusters)), axis=1)[:, :tastes]


class Rule:
    """One kind's next-item rule for the users of a chunk, sorted longest first so that the
    users still active at step ``t`` are the first ``k``; ``prev`` ``[k]`` -> items ``[k]``."""

    def step(self, t: int, prev: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError


class LatentRule(Rule):
    def __init__(self, world: World, spec: SynthSpec, users: int, rng: np.random.Generator):
        self.world, self.spec = world, spec
        self.taste = rng.integers(0, spec.clusters, size=users)
        noise = unit(rng.standard_normal((users, spec.latent_dim)))
        self.taste_vec = unit(world.centroids[self.taste] + noise).astype(np.float32)  # [U, k]

    def step(self, t: int, prev: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        k, world, spec = len(prev), self.world, self.spec
        u = rng.random(k)
        in_cluster = rng.random(k) < spec.p_cluster
        draw = np.where(in_cluster, world.cluster_draw(self.taste[:k], u), world.global_draw(u))
        if t:
            follow = self.latent_step(prev, rng)
            draw = np.where(rng.random(k) < spec.p_transition, follow, draw)
        return draw

    def latent_step(self, prev: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Gumbel-max over ``candidates`` cluster draws, scored by ``latent[prev] + taste``."""
        k, c, world = len(prev), self.spec.candidates, self.world
        half = c // 2
        clusters = np.concatenate(
            [np.repeat(world.item_cluster[prev], half).reshape(k, half),
             np.repeat(self.taste[:k], c - half).reshape(k, c - half)], axis=1,
        )  # fmt: skip
        cands = world.cluster_draw(clusters.ravel(), rng.random(k * c)).reshape(k, c)
        query = world.latent[prev] + self.taste_vec[:k]  # [K, k]
        scores = self.spec.kappa * np.einsum("kd,kcd->kc", query, world.latent[cands])
        scores += rng.gumbel(size=scores.shape)
        return cands[np.arange(k), scores.argmax(axis=1)]


class SeriesRule(Rule):
    def __init__(self, world: World, spec: SynthSpec, users: int, rng: np.random.Generator):
        self.world, self.spec = world, spec
        self.tastes = user_tastes(spec, users, rng)  # [U, tastes]
        start = world.cluster_draw(self.tastes.ravel(), rng.random(self.tastes.size))
        self.pos = world.series_pos[start].reshape(self.tastes.shape)  # where each user is

    def step(self, t: int, prev: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        k = len(prev)
        rows, which = np.arange(k), rng.integers(0, self.tastes.shape[1], size=k)
        cluster = self.tastes[rows, which]
        self.pos[rows, which] += 1 + np.searchsorted(SERIES_STEPS, rng.random(k), side="right")
        item = self.world.series_item(cluster, self.pos[rows, which])
        noise = self.world.cluster_draw(cluster, rng.random(k))
        return np.where(rng.random(k) < self.spec.p_noise, noise, item)


class TasteRule(Rule):
    def __init__(self, world: World, spec: SynthSpec, users: int, rng: np.random.Generator):
        self.world, self.spec = world, spec
        self.tastes = user_tastes(spec, users, rng)

    def step(self, t: int, prev: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        k = len(prev)
        which = rng.integers(0, self.tastes.shape[1], size=k)
        item = self.world.cluster_draw(self.tastes[np.arange(k), which], rng.random(k))
        noise = self.world.global_draw(rng.random(k))
        return np.where(rng.random(k) < self.spec.p_noise, noise, item)


class MarkovRule(Rule):
    def __init__(self, world: World, spec: SynthSpec, users: int, rng: np.random.Generator):
        self.world, self.spec = world, spec
        weights = SUCCESSOR_WEIGHTS[: spec.fanout]
        self.cdf = weights / weights[-1]

    def step(self, t: int, prev: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        k = len(prev)
        draw = self.world.global_draw(rng.random(k))
        if not t:
            return draw
        choice = np.searchsorted(self.cdf, rng.random(k), side="right")
        follow = self.world.successors[prev, choice]
        return np.where(rng.random(k) < self.spec.p_follow, follow, draw)


class MixtureRule(Rule):
    """Half ``markov`` steps, half ``taste`` steps (also the ``longtail`` kind's rule)."""

    def __init__(self, world: World, spec: SynthSpec, users: int, rng: np.random.Generator):
        self.markov = MarkovRule(world, spec, users, rng)
        self.taste = TasteRule(world, spec, users, rng)

    def step(self, t: int, prev: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        markov, taste = self.markov.step(t, prev, rng), self.taste.step(t, prev, rng)
        return np.where(rng.random(len(prev)) < 0.5, markov, taste)


RULES: dict[str, type[Rule]] = {
    "latent": LatentRule,
    "series": SeriesRule,
    "markov": MarkovRule,
    "taste": TasteRule,
    "mixture": MixtureRule,
    "longtail": MixtureRule,
}


def simulate(
    world: World, spec: SynthSpec, lengths: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user position in ``lengths``, item, timestamp) of one chunk's events, shuffled.

    Steps all users of the chunk together; users are sorted by length so the ones still
    active at step t are a prefix.
    """
    order = np.argsort(-lengths, kind="stable")
    sorted_len = lengths[order]
    offsets = np.cumsum(sorted_len) - sorted_len
    total = int(sorted_len.sum())
    rule = RULES[spec.kind](world, spec, len(lengths), rng)
    items = np.empty(total, dtype=np.int64)
    prev = np.empty(len(lengths), dtype=np.int64)
    for t in range(int(sorted_len[0]) if len(lengths) else 0):
        k = int(np.searchsorted(-sorted_len, -t, side="left"))
        prev = rule.step(t, prev[:k], rng)
        items[offsets[:k] + t] = prev
    gaps = rng.integers(1, 3 * 86_400, size=total)
    cumulative = np.cumsum(gaps)
    starts = BASE_TIME + rng.integers(0, 365 * 86_400, size=len(lengths))
    restart = np.repeat(cumulative[offsets] - gaps[offsets] - starts, sorted_len)
    timestamps = cumulative - restart
    users = np.repeat(order, sorted_len)
    shuffle = rng.permutation(total)
    return users[shuffle], items[shuffle], timestamps[shuffle]


def names(prefix: str, ids: np.ndarray, count: int) -> pa.Array:
    """String ids like ``u000123``: ``prefix`` + the zero-padded number."""
    width = max(6, len(str(count - 1)))
    digits = pc.utf8_lpad(pc.cast(pa.array(ids), pa.string()), width=width, padding="0")
    return pc.binary_join_element_wise(pa.scalar(prefix), digits, "")


def chunks(spec: SynthSpec) -> Iterator[pa.Table]:
    """The event log as tables of about ``CHUNK_EVENTS`` rows (columns user_id, item_id,
    timestamp)."""
    world = build_world(spec)
    lengths = user_lengths(spec)
    item_names = names("i", np.arange(spec.items), spec.items)
    bounds = np.searchsorted(np.cumsum(lengths), np.arange(CHUNK_EVENTS, spec.events, CHUNK_EVENTS))
    starts = np.r_[0, np.unique(bounds + 1)]
    ends = np.r_[starts[1:], spec.users]
    for index, (lo, hi) in enumerate(zip(starts, ends, strict=True)):
        if lo >= hi:
            continue
        rng = np.random.default_rng([spec.seed, 1, index])
        users, items, timestamps = simulate(world, spec, lengths[lo:hi], rng)
        yield pa.table(
            {
                "user_id": names("u", users + lo, spec.users),
                "item_id": pa.DictionaryArray.from_arrays(
                    pa.array(items.astype(np.int32)), item_names
                ),
                "timestamp": pa.array(timestamps),
            }
        )


def iso_times(seconds: pa.Array) -> pa.Array:
    """int64 epoch seconds -> ISO-8601 UTC strings (``2020-09-13T12:26:40Z``)."""
    stamps = pc.cast(seconds, pa.timestamp("s", tz="UTC"))
    return pc.strftime(stamps, format="%Y-%m-%dT%H:%M:%SZ")


def used_dictionary(column: pa.ChunkedArray) -> pa.DictionaryArray:
    """A dictionary column with only the entries its rows use: a chunk's file then holds the
    names of the items it has, not the whole catalogue's (16 million names: 165 MB a file)."""
    array = column.combine_chunks()
    used, indices = np.unique(array.indices.to_numpy(zero_copy_only=False), return_inverse=True)
    return pa.DictionaryArray.from_arrays(
        pa.array(indices.astype(np.int32)), array.dictionary.take(pa.array(used))
    )


def write_chunk(out: OutputStaging, index: int, table: pa.Table, fmt: str, iso: bool) -> None:
    """Write one chunk as ``part-<index>.<fmt>`` into the staging directory."""
    name = f"part-{index:05d}.{'jsonl' if fmt == 'json' else fmt}"
    if fmt == "parquet":
        table = table.set_column(1, "item_id", used_dictionary(table["item_id"]))
    else:
        table = table.set_column(1, "item_id", table["item_id"].cast(pa.string()))
    if iso:
        table = table.set_column(2, "timestamp", iso_times(table["timestamp"]))
    with out.open(name, "wb") as f:
        if fmt == "parquet":
            pq.write_table(table, f)
        elif fmt == "csv":  # a plain header and unquoted values, as most exports have
            f.write((",".join(table.column_names) + "\n").encode())
            options = pacsv.WriteOptions(include_header=False, quoting_style="none")
            pacsv.write_csv(table, f, options)
        else:
            f.write(table.to_pandas().to_json(orient="records", lines=True).encode())


def write_log(url: str, spec: SynthSpec, fmt: str = "parquet", iso_time: bool = False) -> int:
    """Generate the log for ``spec`` into the directory ``url``; returns the events written."""
    spec = spec.resolved()
    written = 0
    with staged_output(url, "synthetic-events") as out:
        for index, table in enumerate(chunks(spec)):
            write_chunk(out, index, table, fmt, iso_time)
            written += table.num_rows
    return written


def parser() -> argparse.ArgumentParser:
    """The command line of ``spark_jobs.synth`` (also ``mqsa-ted synth``)."""
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Writes: URL/part-NNNNN.<format> (one file per ~1M events) and URL/_COMPLETE. "
        "Reads: nothing.",
    )
    p.add_argument("--out", required=True, help="output directory URL (any fsspec URL)")
    p.add_argument("--events", type=int, required=True)
    p.add_argument("--users", type=int, default=0, help="default: events / 20")
    p.add_argument("--items", type=int, default=0, help="default: events / 100")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kind", choices=KINDS, default="latent", help="what decides the next item")
    p.add_argument("--format", choices=("parquet", "csv", "json"), default="parquet")
    p.add_argument("--time", choices=("seconds", "iso"), default="seconds",
                   help="timestamps as int64 epoch seconds or ISO-8601 strings")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    spec = SynthSpec(args.events, args.users, args.items, args.seed, args.kind)
    start = time.perf_counter()
    try:
        written = write_log(args.out, spec, args.format, args.time == "iso")
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"[synth] {written} {args.kind} events -> {args.out} in {time.perf_counter() - start:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
