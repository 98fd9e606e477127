"""The recommender behind ``mqsa-ted recommend`` (its command line and the checks made before
an export is loaded: :mod:`mqsa_ted.recommend_cli`): top-K items for histories of raw item ids.

Queries go through the export's FAISS index (exact flat up to 200k items, IVF or HNSW when the
export built one, searched with the ``nprobe`` / ``efSearch`` its manifest records); an export
written with ``--faiss none`` gets an exact flat index built at load. The search fetches ``k``
plus the number of excluded items and drops the excluded ones, so a flat index returns exactly
the top ``k`` of the items left (fewer when fewer are left).
A model trained with ``model.transition_term`` adds ``w * log(1 + max(count - 1, 0))`` to the
scores of the last item's successors (``transitions.parquet`` of the export): the search then
also fetches as many items as the last item has successors, and the successors are scored
exactly, so the result is still the exact top ``k`` under a flat index.

Trust boundary: an export is data, loaded weights-only (JSON, Parquet, FAISS's binary format and
``torch.load(weights_only=True)``): a tampered export cannot run code, every file must match
the sha256 its manifest records, and every file is read from the version directory itself,
never through a symbolic link (:func:`mqsa_ted.manifest.read_inside`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from embeddings.base import ItemTable
from embeddings.factory import table_from_rows
from mqsa_core.config import ModelConfig
from mqsa_core.errors import first_line
from mqsa_core.storage import url_to_fs
from mqsa_ted.manifest import (
    ENCODER,
    FAISS_INDEX,
    TRANSITIONS,
    ExportError,
    Manifest,
    apply_search,
    check_fresh,
    load_tensors,
    read_checked,
    read_manifest,
    resolve_version,
)
from mqsa_ted.recommend_cli import QueryError, history_ids, main  # noqa: F401 (main: python -m)
from trainer.data.teacher import csr_offsets
from trainer.model.encoder import MQSAEncoder

QUERY_BATCH = 1024  # histories encoded and searched together
ITEM_COLUMNS = {"item_id", "index", "count", "vector"}
# up to this many histories are encoded on one thread: on a few sequences intra-op threads only
# wait for each other (on a busy 2-core machine one query took ~100 ms on 2 threads, <1 ms on 1)
SMALL_BATCH = 16


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (the previous number is restored)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Recommendations:
    items: list  # raw ids, best first
    # inner products, plus the transition term where the model has one (item counts for a
    # popular fallback)
    scores: list[float]
    unknown: list[str]  # history ids not in the catalogue (skipped)
    popular: bool = False  # the history had no known item: the most popular items


class UserEncoder(nn.Module):
    """History vectors ``[B, M, D]`` (right-aligned, zero rows at padding) and their mask
    ``[B, M]`` -> query vectors ``[B, D]``."""

    def __init__(self, encoder: MQSAEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(history, mask, last_only=True)[:, -1]


def encode_rows(
    encoder: UserEncoder, table: ItemTable, rows: list[np.ndarray], max_len: int
) -> np.ndarray:
    """Query vectors ``[B, D]`` of histories given as item rows of ``table``: the last
    ``max_len`` rows of each, right-aligned (padding elsewhere)."""
    m, pad = max_len, table.padding_id
    batch = torch.full((len(rows), m), pad, dtype=torch.int64)
    for b, r in enumerate(rows):
        tail = r[-m:]
        batch[b, m - len(tail) :] = torch.from_numpy(tail)
    threads = 1 if len(rows) <= SMALL_BATCH else torch.get_num_threads()
    with torch.no_grad(), torch_threads(threads):
        return encoder(table.lookup(batch), batch != pad).numpy()


def parquet_table(payload: bytes, url: str) -> pa.Table:
    """The Parquet file ``payload`` (the checked bytes of ``url``) as a table."""
    try:
        return pq.read_table(pa.BufferReader(payload))
    except pa.ArrowException as e:
        raise ExportError(f"{url} is not a Parquet file ({first_line(e)}): re-run export") from e


def read_items(version_url: str, m: Manifest) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """``(raw ids [N], counts [N], vectors [N, D] float32)`` in row order from a version's
    item parts (each checked against its sha256), vectorised: linear in N."""
    parts = [parquet_table(read_checked(version_url, name, m), f"{version_url}/{name}")
             for name in m.parts]  # fmt: skip
    items = pa.concat_tables(parts) if parts else pa.table({})
    if items.num_rows != m.count or not ITEM_COLUMNS <= set(items.column_names):
        raise ExportError(f"{version_url}: items/ do not hold the manifest's {m.count} rows "
                          f"of {', '.join(sorted(ITEM_COLUMNS))}")  # fmt: skip
    index = items.column("index").to_numpy()
    order = None
    if not np.array_equal(index, np.arange(m.count)):
        order = np.argsort(index, kind="stable")
        if not np.array_equal(index[order], np.arange(m.count)):
            raise ExportError(f"{version_url}: item rows are not 0..{m.count - 1} once each")
    vector = items.column("vector").combine_chunks()
    kind = vector.type
    if not (pa.types.is_fixed_size_list(kind) and kind.list_size == m.dim
            and kind.value_type == pa.float32()):  # fmt: skip
        raise ExportError(f"{version_url}: vectors are {kind}, not float32[{m.dim}]")
    vectors = vector.flatten().to_numpy().reshape(m.count, m.dim)
    ids, counts = items.column("item_id").combine_chunks(), items.column("count").to_numpy()
    if order is None:  # a writable copy (Arrow's buffers are read-only)
        return ids, counts, vectors.copy()
    return ids.take(order), counts[order], vectors[order]


class Successors:
    """The transition term's side of an export: each row's successors and ``w *
    log_count`` (``trainer.model.transition_term``), as CSR arrays on the host."""

    def __init__(self, payload: bytes, count: int, weight: float, url: str) -> None:
        edges = parquet_table(payload, url)
        if not {"src", "dst", "log_count"} <= set(edges.column_names):
            raise ExportError(f"{url}: not a transition graph (src, dst, log_count)")
        src, self.dst = (edges.column(c).to_numpy() for c in ("src", "dst"))
        bad = src.size and (src.min() < 0 or src.max() >= count or self.dst.min() < 0
                            or self.dst.max() >= count or np.any(np.diff(src) < 0))  # fmt: skip
        if bad:
            raise ExportError(f"{url}: edges outside rows 0..{count - 1} or not sorted by src")
        self.bonus = weight * edges.column("log_count").to_numpy().astype(np.float32)
        self.indptr = csr_offsets(src, count)  # [N + 1]

    def of(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """``(successor rows [S], their additions [S])`` of ``row``."""
        start, end = self.indptr[row], self.indptr[row + 1]
        return self.dst[start:end], self.bonus[start:end]

    def degree(self, rows: list[int]) -> int:
        """The most successors any of ``rows`` has."""
        return int(max(self.indptr[r + 1] - self.indptr[r] for r in rows)) if rows else 0


class Recommender:
    """Loads an export once (time linear in the catalogue) and answers top-K queries.

    Args:
        export_dir: the export URL (its ``CURRENT`` names the version read).
        allow_stale: skip the check that the export's weights are the run's ``model.pt``.
        run_dir: the run to check against (None: the manifest's source run, if readable).
        exclude_history: never recommend history items (None: from the evaluation protocol).
    """

    def __init__(
        self,
        export_dir: str,
        allow_stale: bool = False,
        run_dir: str | None = None,
        exclude_history: bool | None = None,
    ) -> None:
        for attempt in range(3):
            self.version_url, self.manifest = read_manifest(export_dir)
            if not allow_stale:
                check_fresh(self.manifest, run_dir, export_dir)
            try:
                self._load()
                break
            except FileNotFoundError as e:  # a newer commit deleted this version while we read
                if attempt == 2 or resolve_version(export_dir)[0] == self.version_url:
                    raise ExportError(f"{self.version_url}: a file is missing ({e})") from e
        if exclude_history is None:
            exclude_history = self.manifest.eval_protocol == "paper"
        self.exclude_history = exclude_history
        self._popular: np.ndarray | None = None

    def _load(self) -> None:
        """Items, encoder and index of ``self.version_url``, each file checked against the
        manifest's sha256; vectorised throughout (no Python loop over the catalogue)."""
        self.item_ids, self.counts, vectors = read_items(self.version_url, self.manifest)
        self.keys = pd.Index(self.item_ids.cast(pa.string()).to_numpy(zero_copy_only=False))
        if not self.keys.is_unique:  # also builds the hash table the lookups use
            raise ExportError(f"{self.version_url}: item_id holds duplicates")
        self.table = table_from_rows(torch.from_numpy(vectors))  # + the zero padding row
        self.vectors = self.table.all_items().detach().numpy()  # [N, D], shares the table
        self.encoder = self._load_encoder()
        self.successors = None
        encoder = self.encoder.encoder
        if encoder.transition_weight is not None:  # as evaluation scored: w x its chosen scale
            url = f"{self.version_url}/{TRANSITIONS}"
            if TRANSITIONS not in self.manifest.files:
                raise ExportError(f"{url}: the model has a transition term but the export does "
                                  "not list its transition graph: re-run export")  # fmt: skip
            payload = read_checked(self.version_url, TRANSITIONS, self.manifest)
            weight = float(encoder.transition_weight.detach() * encoder.transition_scale)
            self.successors = Successors(payload, self.count, weight, url)
        self.index, self.exact = self._load_index()

    def _load_encoder(self) -> UserEncoder:
        """``trainer.model.encoder.MQSAEncoder`` rebuilt from the manifest's config, weights loaded
        with ``torch.load(weights_only=True)`` (nothing in the file can run code)."""
        m, url = self.manifest, f"{self.version_url}/{ENCODER}"
        # the bytes checked against the manifest are the bytes loaded (no second read)
        state = load_tensors(read_checked(self.version_url, ENCODER, m), url, "re-run export")
        try:
            encoder = MQSAEncoder(ModelConfig(**m.model), m.max_len)
            encoder.load_state_dict(state)
        except (TypeError, RuntimeError, AttributeError) as e:
            raise ExportError(f"{url} does not match the manifest's model config: {e}") from e
        return UserEncoder(encoder).eval()

    def _load_index(self):
        """``(FAISS index, exact)``: the export's index, or an exact flat one built here."""
        import faiss

        m = self.manifest
        if m.faiss is None:
            index = faiss.IndexFlatIP(m.dim)
            index.add(self.vectors)
            return index, True
        payload = read_checked(self.version_url, FAISS_INDEX, m)
        try:
            index = faiss.deserialize_index(np.frombuffer(payload, dtype=np.uint8))
        except RuntimeError as e:
            raise ExportError(f"{self.version_url}/{FAISS_INDEX} is not a FAISS index") from e
        if (index.ntotal, index.d, index.metric_type) != (
            m.count, m.dim, faiss.METRIC_INNER_PRODUCT
        ):  # fmt: skip
            raise ExportError(f"{self.version_url}/{FAISS_INDEX} does not match its items")
        # the search parameter export chose (tuned to a recall, or the build's default)
        search = m.faiss.get("search", {}) if isinstance(m.faiss, dict) else m.faiss
        apply_search(index, search, f"{self.version_url}/{FAISS_INDEX}")
        return index, isinstance(index, faiss.IndexFlat)

    @property
    def count(self) -> int:
        return self.manifest.count

    def rows_of(self, histories: list[list]) -> tuple[list[np.ndarray], list[list[str]]]:
        """Per history: the rows of its known items (history order) and its unknown ids."""
        raw = np.array([str(i) for h in histories for i in h], dtype=object)
        rows = self.keys.get_indexer(raw) if raw.size else np.empty(0, np.int64)
        cuts = np.cumsum([len(h) for h in histories])[:-1]
        pairs = zip(np.split(rows, cuts), np.split(raw, cuts), strict=True)
        known, unknown = zip(*((r[r >= 0], list(ids[r < 0])) for r, ids in pairs), strict=True)
        return list(known), list(unknown)

    def encode(self, rows: list[np.ndarray]) -> np.ndarray:
        """Query vectors ``[B, D]`` of histories given as rows (:func:`encode_rows`)."""
        return encode_rows(self.encoder, self.table, rows, self.manifest.max_len)

    def search(
        self, queries: np.ndarray, excluded: list[np.ndarray], k: int
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(rows, scores)`` per query: its best ``min(k, N - excluded)`` items outside its
        ``excluded`` rows (distinct). The index is asked for ``k + max excluded`` so the
        excluded ones can be dropped; an approximate index that still returns too few is
        completed by an exact scan of that query."""
        fetch = min(self.count, k + max(len(e) for e in excluded))
        scores, found = self.index.search(np.ascontiguousarray(queries, np.float32), fetch)
        out = []
        for q, e, s, f in zip(queries, excluded, scores, found, strict=True):
            want = min(k, self.count - len(e))
            keep = (f >= 0) & ~np.isin(f, e)
            rows, vals = f[keep][:want], s[keep][:want]
            if len(rows) < want and not self.exact:
                rows, vals = self.exact_top(q, e, want)
            out.append((rows, vals))
        return out

    def exact_top(self, query: np.ndarray, excluded: np.ndarray, want: int):
        """``(rows, scores)`` of the best ``want`` items outside ``excluded`` by a full scan."""
        scores = self.vectors @ query
        scores[excluded] = -np.inf
        top = np.argpartition(-scores, want - 1)[:want]
        top = top[np.argsort(-scores[top], kind="stable")]
        return top, scores[top]

    def popular(self, k: int, unknown: list[str]) -> Recommendations:
        """The ``k`` items most frequent in the prepared data."""
        if self._popular is None:
            self._popular = np.argsort(-self.counts, kind="stable")
        top = self._popular[:k]
        return Recommendations(self.raw(top), self.counts[top].astype(float).tolist(), unknown,
                               popular=True)  # fmt: skip

    def raw(self, rows: np.ndarray) -> list:
        return self.item_ids.take(pa.array(rows, pa.int64())).to_pylist()

    def recommend(
        self, histories: list[list], k: int = 10, popular_fallback: bool = False
    ) -> list[Recommendations]:
        """Top-``k`` per history (raw ids, oldest first). Raises :class:`QueryError` for
        ``k < 1`` and for a history without a known item unless ``popular_fallback``."""
        if k < 1:
            raise QueryError(f"k must be at least 1, got {k}")
        if not histories:
            return []
        rows, unknown = self.rows_of(histories)
        empty = [b for b, r in enumerate(rows) if r.size == 0]
        if empty and not popular_fallback:
            raise QueryError(
                f"{len(empty)} of {len(histories)} histories hold no known item (history "
                f"{empty[0]}: {', '.join(map(str, histories[empty[0]][:5])) or 'empty'}); pass "
                "--popular-fallback to answer them with the most popular items"
            )
        results: list[Recommendations | None] = [None] * len(histories)
        for b in empty:
            results[b] = self.popular(k, unknown[b])
        known = [b for b, r in enumerate(rows) if r.size]
        for start in range(0, len(known), QUERY_BATCH):
            chunk = known[start : start + QUERY_BATCH]
            queries = self.encode([rows[b] for b in chunk])
            excluded = [np.unique(rows[b]) if self.exclude_history else rows[b][:0] for b in chunk]
            last = [int(rows[b][-1]) for b in chunk]
            extra = self.successors.degree(last) if self.successors is not None else 0
            found = self.search(queries, excluded, k + extra)
            for i, (b, (top, scores)) in enumerate(zip(chunk, found, strict=True)):
                if self.successors is not None:
                    top, scores = self.with_successors(queries[i], excluded[i], last[i], top,
                                                       scores, k)  # fmt: skip
                results[b] = Recommendations(self.raw(top), scores.tolist(), unknown[b])
        return results

    def with_successors(
        self, query: np.ndarray, excluded: np.ndarray, last: int, rows: np.ndarray,
        scores: np.ndarray, k: int,
    ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """The best ``k`` of the searched ``rows`` (``k`` + the last item's successor count of
        them, by inner product) once the last item's successors get their transition term:
        the successors are scored exactly, found by the search or not."""
        succ, bonus = self.successors.of(last)
        keep = ~np.isin(succ, excluded)
        succ, bonus = succ[keep], bonus[keep]
        others = ~np.isin(rows, succ)
        rows = np.concatenate([rows[others], succ])
        scores = np.concatenate([scores[others], self.vectors[succ] @ query + bonus])
        best = np.argsort(-scores, kind="stable")[:k]
        return rows[best], scores[best]


def run(args: argparse.Namespace) -> None:
    """The command's work once :func:`mqsa_ted.recommend_cli.check` has passed (raises
    :class:`UserError` for anything the user can fix)."""
    rec = Recommender(args.export_dir, args.allow_stale, exclude_history=args.exclude_history)
    if args.history is not None:
        (result,) = rec.recommend([history_ids(args.history)], args.k, args.popular_fallback)
        if result.unknown:
            print(f"skipped unknown item ids: {', '.join(result.unknown)}", file=sys.stderr)
        if result.popular:
            print("no known item in the history: the most popular items", file=sys.stderr)
        for rank, (item, score) in enumerate(zip(result.items, result.scores, strict=True), 1):
            print(f"{rank:3d}  {item}  {score:.4f}")
        return
    histories = read_batch(args.batch)
    lists = [h or [] for h in histories.column("history").to_pylist()]  # null: no history
    results = rec.recommend(lists, args.k, args.popular_fallback)
    unknown = sorted({i for r in results for i in r.unknown})
    if unknown:
        print(f"skipped {len(unknown)} unknown item ids: {', '.join(unknown[:20])}"
              + (" ..." if len(unknown) > 20 else ""), file=sys.stderr)  # fmt: skip
    out = pa.table(
        {
            "user_id": histories.column("user_id"),
            "items": [[str(i) for i in r.items] for r in results],
            "scores": [r.scores for r in results],
        }
    )
    if args.out:
        fs, path = url_to_fs(args.out)
        with fs.open(path, "wb") as f:
            pq.write_table(out, f)
        print(f"wrote {out.num_rows} rows to {args.out}")
    else:
        print(out.to_pandas().to_string())


def read_batch(url: str) -> pa.Table:
    """``user_id`` and ``history`` of a ``--batch`` Parquet file (one ``error:`` line if it
    cannot be read, e.g. replaced since it was checked)."""
    fs, path = url_to_fs(url)
    try:
        with fs.open(path, "rb") as f:
            return pq.read_table(f, columns=["user_id", "history"])
    except (pa.ArrowException, OSError) as e:
        raise QueryError(f"--batch {url} cannot be read as Parquet ({first_line(e)})") from e


if __name__ == "__main__":
    sys.exit(main())
