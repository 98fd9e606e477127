"""Seeded synthetic event logs with planted structure a sequential model can learn.

    python -m spark_jobs.synth --out URL --events N [--users U] [--items I] [--seed S]
                               [--format parquet|csv|json]

Structure: item popularity is Zipf(-Mandelbrot)-distributed (long tail); items belong to taste
clusters and have latent vectors near their cluster's centroid; every user has a taste cluster
and a taste vector. The first item comes from the user's cluster (80%) or the whole catalogue;
after that, with probability 0.7, the next item is picked among a few dozen popularity-drawn
candidates (half from the previous item's cluster, half from the user's) with probability
proportional to ``exp(kappa * (latent[prev] + taste) . latent[candidate])``; otherwise it is a
fresh taste draw. A last-item counter sees only ``prev``; a sequence model can also infer the
taste from the history, and the latent structure generalises across sparse pairs.
Ids are strings ("u000123", "i004567"); timestamps are int64 seconds, strictly increasing
within a user. Every user has at least 3 events and the total is exactly N.

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


@dataclass(frozen=True)
class SynthSpec:
    """What to generate. ``users`` / ``items`` of 0 pick defaults from ``events``."""

    events: int
    users: int = 0
    items: int = 0
    seed: int = 0
    clusters: int = 16
    candidates: int = 32
    latent_dim: int = 16
    kappa: float = 4.0
    p_transition: float = 0.7
    p_cluster: float = 0.8
    zipf_a: float = 1.1
    zipf_q: float = 10.0

    def resolved(self) -> SynthSpec:
        """The spec with default sizes filled in and checked."""
        users = self.users or max(1, self.events // 20)
        items = self.items or max(10, self.events // 100)
        if self.events < 3 * users:
            raise PrepareError(f"--events {self.events} < 3 x --users {users}: each user needs 3")
        return dataclasses.replace(
            self, users=users, items=items, clusters=min(self.clusters, items)
        )


@dataclass(frozen=True)
class World:
    """The planted structure: popularity, clusters and latent item vectors."""

    global_items: np.ndarray  # items in popularity order
    global_cdf: np.ndarray  # cumulative popularity along global_items
    cluster_items: np.ndarray  # items grouped by cluster, popularity order inside
    cluster_cdf: np.ndarray  # cluster id + cumulative popularity inside the cluster
    item_cluster: np.ndarray  # [items] cluster of each item
    centroids: np.ndarray  # [clusters, k] unit cluster centroids
    latent: np.ndarray  # [items, k] unit item vectors near their cluster's centroid

    def global_draw(self, u: np.ndarray) -> np.ndarray:
        """Items drawn by popularity (``u`` uniform in [0, 1))."""
        idx = np.searchsorted(self.global_cdf, u, side="right")
        return self.global_items[np.minimum(idx, len(self.global_items) - 1)]

    def cluster_draw(self, cluster: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Items drawn by popularity inside each ``cluster``."""
        idx = np.searchsorted(self.cluster_cdf, cluster + u, side="right")
        return self.cluster_items[np.minimum(idx, len(self.cluster_items) - 1)]


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
    return World(
        global_items=global_items,
        global_cdf=np.cumsum(popularity),
        cluster_items=cluster_items,
        cluster_cdf=cluster_cdf,
        item_cluster=item_cluster,
        centroids=centroids,
        latent=latent.astype(np.float32),
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
    taste = rng.integers(0, spec.clusters, size=len(lengths))
    noise = unit(rng.standard_normal((len(lengths), spec.latent_dim)))
    taste_vec = unit(world.centroids[taste] + noise).astype(np.float32)  # [U, k]
    items = np.empty(total, dtype=np.int64)
    prev = np.empty(0, dtype=np.int64)
    for t in range(int(sorted_len[0]) if len(lengths) else 0):
        k = int(np.searchsorted(-sorted_len, -t, side="left"))
        u = rng.random(k)
        in_cluster = rng.random(k) < spec.p_cluster
        draw = np.where(in_cluster, world.cluster_draw(taste[:k], u), world.global_draw(u))
        if t:
            follow = next_items(world, spec, prev[:k], taste[:k], taste_vec[:k], rng)
            draw = np.where(rng.random(k) < spec.p_transition, follow, draw)
        items[offsets[:k] + t] = draw
        prev = draw
    gaps = rng.integers(1, 3 * 86_400, size=total)
    cumulative = np.cumsum(gaps)
    starts = BASE_TIME + rng.integers(0, 365 * 86_400, size=len(lengths))
    restart = np.repeat(cumulative[offsets] - gaps[offsets] - starts, sorted_len)
    timestamps = cumulative - restart
    users = np.repeat(order, sorted_len)
    shuffle = rng.permutation(total)
    return users[shuffle], items[shuffle], timestamps[shuffle]


def next_items(
    world: World,
    spec: SynthSpec,
    prev: np.ndarray,
    taste: np.ndarray,
    taste_vec: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """One latent-space step for ``K`` users: ``prev`` ``[K]`` items, ``taste`` ``[K]``
    clusters, ``taste_vec`` ``[K, k]`` -> next items ``[K]`` (Gumbel-max over candidates)."""
    k, c = len(prev), spec.candidates
    half = c // 2
    clusters = np.concatenate(
        [np.repeat(world.item_cluster[prev], half).reshape(k, half),
         np.repeat(taste, c - half).reshape(k, c - half)], axis=1,
    )  # fmt: skip
    cands = world.cluster_draw(clusters.ravel(), rng.random(k * c)).reshape(k, c)
    query = world.latent[prev] + taste_vec  # [K, k]
    scores = spec.kappa * np.einsum("kd,kcd->kc", query, world.latent[cands])
    scores += rng.gumbel(size=scores.shape)
    return cands[np.arange(k), scores.argmax(axis=1)]


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


def write_chunk(out: OutputStaging, index: int, table: pa.Table, fmt: str) -> None:
    """Write one chunk as ``part-<index>.<fmt>`` into the staging directory."""
    name = f"part-{index:05d}.{'jsonl' if fmt == 'json' else fmt}"
    if fmt != "parquet":
        table = table.set_column(1, "item_id", table["item_id"].cast(pa.string()))
    with out.open(name, "wb") as f:
        if fmt == "parquet":
            pq.write_table(table, f)
        elif fmt == "csv":
            pacsv.write_csv(table, f)
        else:
            f.write(table.to_pandas().to_json(orient="records", lines=True).encode())


def write_log(url: str, spec: SynthSpec, fmt: str = "parquet") -> int:
    """Generate the log for ``spec`` into the directory ``url``; returns the events written."""
    spec = spec.resolved()
    written = 0
    with staged_output(url, "synthetic-events") as out:
        for index, table in enumerate(chunks(spec)):
            write_chunk(out, index, table, fmt)
            written += table.num_rows
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory URL (any fsspec URL)")
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--users", type=int, default=0, help="default: events / 20")
    parser.add_argument("--items", type=int, default=0, help="default: events / 100")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=("parquet", "csv", "json"), default="parquet")
    args = parser.parse_args(argv)
    spec = SynthSpec(args.events, args.users, args.items, args.seed)
    start = time.perf_counter()
    try:
        written = write_log(args.out, spec, args.format)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[synth] {written} events -> {args.out} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
