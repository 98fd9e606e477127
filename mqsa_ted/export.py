"""Export a trained run for retrieval: item vectors, the user encoder's weights, a FAISS index.

    mqsa-ted export RUN_DIR [--out URL] [--faiss auto|flat|ivf|hnsw|none] [--target-recall R]
    torchrun --nproc_per_node=2 -m mqsa_ted.export RUN_DIR ...   # TorchRec runs: per rank

Reads ``RUN_DIR/config.yaml``, ``RUN_DIR/model.pt`` (the best-validation weights; a TorchRec
run's table from its ``best_table-e*/`` snapshot) and ``<data.dir>/vocab/`` (raw ids, counts).
Writes a new version of the export at ``--out`` (default ``export.out``, else
``RUN_DIR/export``; layout in :mod:`mqsa_ted.manifest`):

- ``items/part-RRRRR.parquet``: ``item_id`` (raw), ``index`` (row), ``count`` (occurrences in
  the prepared data, for ``recommend --popular-fallback``), ``vector`` (list<float32>[D]); each
  rank writes the rows it holds (its shard of a TorchRec table): the table is never gathered;
- ``user_encoder.pt``: the encoder's tensors (``mqsa_core.storage.save_state``); the manifest holds
  the ``model`` config and ``max_len`` from which ``recommend`` rebuilds
  ``trainer.model.encoder.MQSAEncoder``. Tensors, not a program: ``torch.export.load`` is not
  weights-only (it falls back to unpickling), so a tampered ``.pt2`` could run code when
  loaded, while ``torch.load(weights_only=True)`` cannot;
- ``transitions.parquet`` (``model.transition_term`` only): the train transition graph
  (``src``, ``dst`` rows and ``log_count`` = ``log(1 + max(count - 1, 0))``), which
  ``recommend`` adds to the scores of the last item's successors;
- ``faiss.index`` (optional) with its recall@10 against exact search printed; its search
  parameter (IVF ``nprobe``, HNSW ``efSearch``) is recorded in the manifest, where
  ``recommend`` reads it. With ``--target-recall R`` the parameter is tuned: the smallest value
  whose recall@10 and recall@100 against exact search reach ``R`` (lower bound: mean minus two
  standard errors) on the query vectors of ``--tune-users`` users of ``<data.dir>/sequences``
  (encoded as ``recommend`` encodes a history);
- ``manifest.json``: shapes, model config, evaluation protocol, the source run (``model.pt``'s
  sha256 and mtime, best epoch, config hash) and every file's sha256;
- then ``CURRENT`` is switched to the new version, and older versions that carry this
  command's ownership marker are deleted. Readers see the old export or the new one, never a
  mix; an export that fails midway leaves the previous one in place (the next export removes
  its unfinished directory).

With several ranks, each leaves the process group once its part is written; rank 0 then builds
the index and commits alone, on every core its process may use, so no collective timeout bounds
the build.

Trust: ``RUN_DIR`` is a trusted artifact of your own training (a TorchRec snapshot's metadata is
unpickled by torch.distributed.checkpoint); its ``model.pt`` is loaded weights-only all the same
(one that holds anything but tensors is refused as unsafe, never loaded otherwise). What this
command writes is loaded weights-only by ``recommend`` and ``report``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import io
import json
import os
import sys
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from embeddings.base import ItemTable
from embeddings.factory import build_item_table, table_from_rows
from mqsa_core import quiet
from mqsa_core.collectives import distributed, host_group, world
from mqsa_core.config import FAISS_KINDS, Config, ConfigError, ModelConfig, config_hash, load_config
from mqsa_core.errors import UserError
from mqsa_core.launch_env import launch_env
from mqsa_core.lease import Lease
from mqsa_core.openmp import usable_cores
from mqsa_core.prepared import SEQUENCES, VOCAB, dataset_files, read_dataset, read_stats
from mqsa_core.storage import OWNER_MARKER as OWNED
from mqsa_core.storage import (
    atomic_write_bytes,
    full_url,
    mark_owned,
    read_json,
    read_parquet,
    save_state,
    url_to_fs,
    write_json,
)
from mqsa_ted.manifest import (
    ADDED_ITEMS,
    CURRENT,
    ENCODER,
    FAISS_INDEX,
    MANIFEST,
    OWNER_MARKER,
    TRANSITIONS,
    VERSIONS,
    ExportError,
    Manifest,
    Source,
    apply_search,
    is_link,
    load_tensors,
    sha256_of,
)
from mqsa_ted.recommend import UserEncoder, encode_rows
from trainer.data.sequences import load_transitions
from trainer.data.teacher import SparseTeacher
from trainer.model.encoder import MQSAEncoder
from trainer.runtime.checkpoint import CheckpointError, load_best_table
from trainer.runtime.distributed import init_distributed, shutdown
from trainer.runtime.run_dir import RunDir


def load_trained(
    run_dir: str, device: torch.device | str = "cpu"
) -> tuple[Config, MQSAEncoder, ItemTable]:
    """``(cfg, encoder, table)`` with a run's best-validation weights.

    The dense backend's table comes from ``model.pt``; a TorchRec table is rebuilt with the
    current world size and loaded from the run's ``best_table-e*`` snapshot (each rank its
    shard), so this is collective under torchrun.
    """
    run = RunDir(run_dir)
    cfg = load_config(run.path("config.yaml"), fit=False)
    checkpoint = run.path("model.pt")
    fs, path = url_to_fs(checkpoint)
    try:
        payload = fs.cat_file(path)
    except FileNotFoundError as e:
        raise ExportError(f"{checkpoint} not found: has the run finished?") from e
    state = load_tensors(payload, checkpoint, "this trainer did not write it; export a run you "
                         "trained")  # fmt: skip
    num_items = int(read_stats(cfg.data.dir)["items"])
    table = build_item_table(cfg.embeddings, cfg.model, num_items, cfg.train.seed, device)
    if table.has_fused_optimizer:
        load_best_table(run_dir, table)
    else:
        weight = state.pop("table.weight")
        if weight.shape != table.weight.shape:
            raise ExportError(
                f"{run.path('model.pt')} holds a {tuple(weight.shape)} table but "
                f"{cfg.data.dir} has {num_items} items (+1 padding row)"
            )
        table.weight.data.copy_(weight)
    encoder = MQSAEncoder(cfg.model, cfg.data.max_len).to(device)
    try:
        encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in state.items()})
    except RuntimeError as e:
        raise ExportError(f"{run.path('model.pt')} does not match config.yaml: {e}") from e
    return cfg, encoder.eval(), table


def vocab_rows(data_dir: str, first: int, count: int) -> pa.Table:
    """``item_id`` (raw) and ``count`` of rows ``first .. first + count - 1`` of
    ``<data_dir>/vocab``, in row order (only those rows are read: a rank never holds the whole
    vocabulary)."""
    index = pc.field("index")
    table = read_dataset(
        data_dir,
        VOCAB,
        ["item_id", "index", "count"],
        filter=(index >= first) & (index < first + count),
    ).sort_by("index")
    if table.num_rows != count:
        raise ExportError(f"{data_dir}/vocab lacks rows {first}..{first + count - 1}: wrong vocab?")
    return table


def write_lineage(version_url: str, data_dir: str, files: dict[str, dict]) -> dict:
    """The manifest's ``data`` entry for ``data_dir``; when it extends a base (incremental
    prepare), the rows added since that base are listed in ``ADDED_ITEMS`` (added to
    ``files``)."""
    stats = read_stats(data_dir)
    base = stats.get("base") or {}
    items, base_items = int(stats["items"]), base.get("items")
    lineage = {"dir": data_dir, "version": stats.get("version"), "items": items,
               "extends": base.get("version"), "base_items": base_items, "added": None}  # fmt: skip
    if base_items is not None:
        added = vocab_rows(data_dir, int(base_items), items - int(base_items))
        url = f"{version_url}/{ADDED_ITEMS}"
        buffer = io.BytesIO()
        pq.write_table(added.select(["item_id", "index"]), buffer)
        atomic_write_bytes(url, buffer.getvalue())
        files[ADDED_ITEMS] = file_entry(url)
        lineage["added"] = ADDED_ITEMS
    return lineage


def write_transitions(version_url: str, data_dir: str, model: ModelConfig) -> dict:
    """``TRANSITIONS``: the graph's edges as the run trained and evaluated with them (the
    teacher's distinct ``(src, dst)`` pairs and features); returns its file entry."""
    num_items = int(read_stats(data_dir)["items"])
    graph = SparseTeacher.from_edges(*load_transitions(data_dir), num_items, model.tau)
    degree = graph.indptr[1:] - graph.indptr[:-1]
    edges = pa.table({
        "src": torch.repeat_interleave(torch.arange(num_items), degree).numpy(),
        "dst": graph.dst.numpy(),
        "log_count": graph.log_count.numpy(),
    })  # fmt: skip
    url = f"{version_url}/{TRANSITIONS}"
    buffer = io.BytesIO()
    pq.write_table(edges, buffer)
    atomic_write_bytes(url, buffer.getvalue())
    return file_entry(url)


def read_vectors(items_url: str, dim: int) -> np.ndarray:
    """All vectors of an ``items/`` directory in row order: ``[N, D]`` float32."""
    table = read_parquet(items_url, ["index", "vector"]).sort_by("index")
    flat = table.column("vector").combine_chunks().flatten().to_numpy()
    return flat.reshape(-1, dim).astype(np.float32, copy=False)


def file_entry(url: str) -> dict:
    """The manifest's record of one written file: ``{"sha256", "bytes"}``."""
    digest, size = sha256_of(url)
    return {"sha256": digest, "bytes": size}


def write_item_rows(
    url: str, data_dir: str, first_id: int, vectors: np.ndarray, chunk: int = 1 << 20
) -> dict:
    """One Parquet part of rows ``first_id ..`` (``vectors [R, D]``): ``item_id`` and ``count``
    from ``<data_dir>/vocab``, ``index``, ``vector`` (list<float32>[D]), written ``chunk`` rows
    at a time (memory stays at one chunk beyond ``vectors``; no dictionary encoding: ids and
    vectors are distinct values). The part lives in a version
    directory no reader sees before the commit, so it is written in place. Returns its manifest
    record (``rows``, ``sha256``, ``bytes``)."""
    fs, path = url_to_fs(url)
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    writer = None
    with fs.open(path, "wb") as f:
        for start in range(0, max(len(vectors), 1), chunk):
            part = vectors[start : start + chunk]
            vocab = vocab_rows(data_dir, first_id + start, len(part))
            table = pa.table(
                {
                    "item_id": vocab.column("item_id"),
                    "index": pa.array(np.arange(first_id + start, first_id + start + len(part))),
                    "count": vocab.column("count").cast(pa.int64()),
                    "vector": pa.FixedSizeListArray.from_arrays(
                        pa.array(part.ravel(), pa.float32()), vectors.shape[1]
                    ),
                }
            )
            writer = writer or pq.ParquetWriter(f, table.schema, use_dictionary=False)
            writer.write_table(table)
        writer.close()
    return {"rows": len(vectors), **file_entry(url)}


def build_faiss(vectors: np.ndarray, kind: str):
    """A FAISS inner-product index: exact up to 200k items, IVF (sqrt(N) lists) above; HNSW on
    request (slow to build on small machines)."""
    import faiss

    n, dim = vectors.shape
    if kind == "auto":
        kind = "flat" if n <= 200_000 else "ivf"
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = 128
    else:
        nlist = max(1, int(np.sqrt(n)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        train = vectors[np.random.default_rng(0).choice(n, min(n, 40 * nlist), replace=False)]
        index.train(train)
        index.nprobe = max(1, nlist // 8)
    index.add(vectors)
    return index, kind


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """``[Q, k]`` rows of the exact inner-product top ``k`` of each query (FAISS's blocked flat
    scan: no ``[Q, N]`` matrix)."""
    import faiss

    exact_index = faiss.IndexFlatIP(vectors.shape[1])
    exact_index.add(vectors)
    return exact_index.search(queries, k)[1]


def recalls(index, exact: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """``[Q]``: the share of each query's exact top ``k`` (``exact [Q, k]``) that ``index``
    returns in its top ``k``."""
    _, approx = index.search(queries, exact.shape[1])
    hits = [len(set(a) & set(e)) for a, e in zip(approx, exact, strict=True)]
    return np.asarray(hits, np.float64) / exact.shape[1]


def faiss_recall_at_10(index, vectors: np.ndarray, queries: np.ndarray) -> float:
    """Recall@10 of ``index`` against exact inner-product search for ``queries`` ``[Q, D]``."""
    return float(recalls(index, exact_neighbours(vectors, queries, 10), queries).mean())


def search_of(index) -> dict[str, int]:
    """The index's search parameter as the manifest records it: ``{"nprobe": n}`` (IVF),
    ``{"efSearch": n}`` (HNSW), ``{}`` (exact)."""
    import faiss

    if isinstance(index, faiss.IndexIVF):
        return {"nprobe": int(index.nprobe)}
    if isinstance(index, faiss.IndexHNSW):
        return {"efSearch": int(index.hnsw.efSearch)}
    return {}


def tune_search(
    index, vectors: np.ndarray, queries: np.ndarray, target: float, ks: tuple[int, ...] = (10, 100)
) -> tuple[dict[str, int], dict[str, float]]:
    """Set the smallest value of the index's search parameter (:func:`search_of`) whose
    recall@k against exact search on ``queries [Q, D]`` reaches ``target`` at every ``k`` of
    ``ks``, counting the estimate's error (mean per-query recall minus two standard errors);
    found by doubling, then bisection (recall grows with ``nprobe`` and ``efSearch``). Where no
    value reaches it, the largest (IVF: every list, exact; HNSW: 4,096 or the item count).
    Returns ``(search parameter, {"recall@k": mean recall at it})``; an exact index: ``({},
    1.0 at every k)``."""
    search = search_of(index)
    if not search:
        return {}, {f"recall@{k}": 1.0 for k in ks}
    ((name, _),) = search.items()
    exact = {k: exact_neighbours(vectors, queries, min(k, len(vectors))) for k in ks}
    first = 1 if name == "nprobe" else min(ks)  # HNSW searches at least k candidates
    top = int(index.nlist) if name == "nprobe" else max(*ks, min(int(index.ntotal), 4096))
    tried: dict[int, tuple[bool, dict[str, float]]] = {}

    def reaches(value: int) -> bool:
        if value not in tried:
            apply_search(index, {name: value}, FAISS_INDEX)
            ok, means = True, {}
            for k, rows in exact.items():
                r = recalls(index, rows, queries)
                error = r.std(ddof=1) / np.sqrt(len(r)) if len(r) > 1 else 0.0
                ok &= bool(r.mean() - 2 * error >= target)
                means[f"recall@{k}"] = float(r.mean())
            tried[value] = (ok, means)
        return tried[value][0]

    low, value = first - 1, first  # low: the largest value known to fall short
    while not reaches(value) and value < top:
        low, value = value, min(2 * value, top)
    while reaches(value) and value - low > 1:
        middle = (low + value) // 2
        if reaches(middle):
            value = middle
        else:
            low = middle
    apply_search(index, {name: value}, FAISS_INDEX)
    return {name: value}, tried[value][1]


def user_queries(
    encoder: MQSAEncoder, vectors: np.ndarray, data_dir: str, max_len: int, users: int
) -> np.ndarray:
    """Query vectors ``[Q, D]`` of up to ``users`` users of ``<data_dir>/sequences`` (an even
    share from the first row groups of each file: nothing else is read), each the user
    encoder's vector of the user's last ``max_len`` train items, as ``recommend`` computes it."""
    files = dataset_files(data_dir, SEQUENCES)
    share = -(-users // max(len(files), 1))
    rows: list[np.ndarray] = []
    for url in files:
        fs, path = url_to_fs(url)
        taken = 0
        with fs.open(path, "rb") as f:
            reader = pq.ParquetFile(f)
            for group in range(reader.num_row_groups):
                histories = reader.read_row_group(group, columns=["train_items"]).column(0)
                for history in histories.to_pylist()[: share - taken]:
                    if history:
                        rows.append(np.asarray(history, np.int64))
                        taken += 1
                if taken >= share:
                    break
    table = table_from_rows(torch.from_numpy(vectors.copy()))  # read_vectors' are read-only
    return encode_rows(UserEncoder(encoder.eval()), table, rows[:users], max_len)


def write_faiss(
    version_url: str,
    vectors: np.ndarray,
    kind: str,
    queries: np.ndarray | None = None,
    target_recall: float | None = None,
) -> tuple[dict, dict]:
    """Build and write ``faiss.index`` over ``vectors [N, D]``; returns its file record and
    ``{"kind", "build_seconds", "recall@10", "search"}``. With ``queries [Q, D]`` and
    ``target_recall``, the search parameter is tuned on them (:func:`tune_search`; the record
    adds ``recall@100``, ``target_recall`` and ``tune_queries``), else recall@10 is measured on
    1,000 item vectors as queries at the build's default parameter."""
    import faiss

    start = time.perf_counter()
    index, kind = build_faiss(vectors, kind)
    build_s = time.perf_counter() - start
    if queries is not None and target_recall is not None:
        search, reached = tune_search(index, vectors, queries, target_recall)
        recall = reached["recall@10"]
        tuned = {**reached, "target_recall": target_recall, "tune_queries": len(queries)}
        how = (f"{search or 'exact'} tuned on {len(queries)} user queries to {target_recall} "
               f"(recall@100 {reached['recall@100']:.4f})")  # fmt: skip
    else:
        n = len(vectors)
        sample = vectors[np.random.default_rng(0).choice(n, min(n, 1000), replace=False)]
        search, recall, tuned = search_of(index), faiss_recall_at_10(index, vectors, sample), {}
        how = f"{search or 'exact'}"
    url = f"{version_url}/{FAISS_INDEX}"
    atomic_write_bytes(url, faiss.serialize_index(index).tobytes())
    print(f"faiss {kind}: built in {build_s:.2f} s, {how}: recall@10 vs exact {recall:.4f}")
    info = {"kind": kind, "build_seconds": build_s, "recall@10": recall, "search": search}
    return file_entry(url), {**info, **tuned}


def new_version(out: str) -> str:
    """A fresh version directory ``<out>/versions/<UTC time, microseconds>-<token>`` (names sort
    by creation) holding our ownership marker (written first: only directories with it are ever
    deleted); returns its URL."""
    now = datetime.datetime.now(datetime.UTC)
    version = f"{now.strftime('%Y%m%dT%H%M%S%f')}-{uuid.uuid4().hex[:8]}"
    url = f"{out.rstrip('/')}/{VERSIONS}/{version}"
    atomic_write_bytes(f"{url}/{OWNER_MARKER}", b"written by mqsa_ted.export\n")
    return url


def commit(out: str, version_url: str, manifest: Manifest) -> None:
    """Write the version's manifest, switch ``CURRENT`` to it (the one atomic step readers
    depend on), then delete the older versions that carry our ownership marker."""
    payload = json.dumps(manifest.to_dict(), indent=2).encode()
    atomic_write_bytes(f"{version_url}/{MANIFEST}", payload)
    root, version = out.rstrip("/"), version_url.rsplit("/", 1)[1]
    pointer = {"version": version, "manifest_sha256": hashlib.sha256(payload).hexdigest()}
    write_json(f"{root}/{CURRENT}", pointer)
    fs, versions = url_to_fs(f"{root}/{VERSIONS}")
    for old in fs.ls(versions, detail=False):
        name = old.rstrip("/").rsplit("/", 1)[1]
        if is_link(full_url(fs, old)):  # not a directory we created: never followed, never deleted
            print(f"note: {old} is a symbolic link: left in place, never read")
        elif name < version and fs.exists(f"{old}/{OWNER_MARKER}"):  # later: a concurrent export
            fs.rm(old, recursive=True)
    if fs.exists(f"{versions.rsplit('/', 1)[0]}/{MANIFEST}"):
        print(f"note: {root} also holds an export in the old unversioned layout (manifest.json, "
              "items/, user_encoder.pt2 at its top): it is never read, delete it")  # fmt: skip


def write_version(
    out: str,
    version_url: str,
    parts: dict[str, dict],
    encoder: MQSAEncoder,
    model: ModelConfig,
    max_len: int,
    eval_protocol: str,
    source: Source,
    faiss_kind: str,
    data_dir: str,
    target_recall: float | None = None,
    tune_users: int = 2000,
) -> Manifest:
    """Finish a version whose item ``parts`` (name -> record from :func:`write_item_rows`) are
    written: the encoder's tensors, the data lineage, the FAISS index (its search parameter
    tuned to ``target_recall`` on ``tune_users`` users' queries when given), the manifest, then
    the commit (rank 0)."""
    names = sorted(parts)  # part-RRRRR: rank order is row order
    files = {name: {k: parts[name][k] for k in ("sha256", "bytes")} for name in names}
    lineage = write_lineage(version_url, data_dir, files)
    encoder_url = f"{version_url}/{ENCODER}"
    save_state(encoder_url, {k: v.detach().cpu() for k, v in encoder.state_dict().items()})
    files[ENCODER] = file_entry(encoder_url)
    if model.transition_term:
        files[TRANSITIONS] = write_transitions(version_url, data_dir, model)
    faiss_info = None
    if faiss_kind != "none":
        vectors = read_vectors(f"{version_url}/items", model.dim)
        queries = None
        if target_recall is not None:
            queries = user_queries(encoder, vectors, data_dir, max_len, tune_users)
        files[FAISS_INDEX], faiss_info = write_faiss(
            version_url, vectors, faiss_kind, queries, target_recall
        )
    manifest = Manifest(
        dim=model.dim,
        count=sum(parts[name]["rows"] for name in names),
        dtype="float32",
        metric="inner_product",
        max_len=max_len,
        model=dataclasses.asdict(model),
        eval_protocol=eval_protocol,
        source=source,
        parts=names,
        files=files,
        faiss=faiss_info,
        data=lineage,
        version=version_url.rsplit("/", 1)[1],
    )
    commit(out, version_url, manifest)
    return manifest


def export_vectors(
    out: str,
    data_dir: str,
    vectors: np.ndarray,
    encoder: MQSAEncoder,
    model: ModelConfig,
    eval_protocol: str = "paper",
    faiss_kind: str = "auto",
    source: Source | None = None,
) -> Manifest:
    """A whole export written by one process: ``vectors [N, D]`` are rows ``0..N-1`` of
    ``<data_dir>/vocab``, ``encoder`` was built from ``model``; ``source`` None records an
    unknown run (recommend then skips the staleness check)."""
    version_url = new_version(out)
    name = "items/part-00000.parquet"
    part = write_item_rows(f"{version_url}/{name}", data_dir, 0, vectors)
    source = source or Source("", "", "", 0.0, None, "")
    return write_version(
        out, version_url, {name: part}, encoder, model, encoder.max_len, eval_protocol, source,
        faiss_kind, data_dir,
    )  # fmt: skip


def modified(url: str) -> float:
    """Modification time of ``url`` (seconds since the epoch; 0 where the store has none)."""
    fs, path = url_to_fs(url)
    try:
        return fs.modified(path).timestamp()
    except (NotImplementedError, AttributeError):
        return 0.0


def fingerprint(checkpoint: str) -> tuple[str, float]:
    """``(sha256, mtime)`` of the run's ``model.pt``."""
    try:
        mtime = modified(checkpoint)
        return sha256_of(checkpoint)[0], mtime
    except FileNotFoundError as e:
        raise ExportError(f"{checkpoint} not found: has the run finished?") from e


def run_source(run_dir: str, cfg: Config, digest: str, mtime: float) -> Source:
    """Where an export comes from (a local run as an absolute path, for later checks)."""
    run = RunDir(run_dir if "://" in run_dir else os.path.abspath(run_dir))
    try:
        best_epoch = read_json(run.path("metrics.json")).get("best_epoch")
    except FileNotFoundError:
        best_epoch = None
    return Source(run.url, run.path("model.pt"), digest, mtime, best_epoch, config_hash(cfg))


def shared_version(out: str, is_main: bool) -> str:
    """The new version's URL on every rank (rank 0 creates it)."""
    box = [new_version(out) if is_main else None]
    if distributed():
        dist.broadcast_object_list(box, src=0, group=host_group())
    return box[0]


def gather_parts(name: str, record: dict) -> dict[str, dict]:
    """Every rank's ``{part name: record}`` (the parts' checksums reach rank 0's manifest)."""
    everyone = [(name, record)]
    if distributed():
        everyone = [None] * world()[1]
        dist.all_gather_object(everyone, (name, record), group=host_group())
    return dict(everyone)


def use_every_core() -> None:
    """Run this process's torch and FAISS work on every core it may use (``usable_cores``):
    called on rank 0 once the other ranks of its node have left, since a launcher such as
    torchrun starts each rank with ``OMP_NUM_THREADS=1``."""
    import faiss

    cores = usable_cores()
    torch.set_num_threads(cores)
    faiss.omp_set_num_threads(cores)


def export_run(
    run_dir: str,
    out: str,
    faiss_kind: str = "auto",
    target_recall: float | None = None,
    tune_users: int = 2000,
) -> Manifest | None:
    """Write a new version of the export of ``run_dir`` at ``out`` and commit it (see the module
    docstring); every rank writes the item rows it holds. Returns the manifest on rank 0, None
    elsewhere."""
    env = init_distributed()
    checkpoint = RunDir(run_dir).path("model.pt")
    digest, mtime = fingerprint(checkpoint) if env.is_main else ("", 0.0)
    cfg, encoder, table = load_trained(run_dir, env.device)
    if env.is_main and modified(checkpoint) != mtime:
        raise ExportError(f"{checkpoint} changed while it was read: is the run still training?")
    version_url = shared_version(out, env.is_main)
    ids, rows = table.export_rows()  # [C], [C, D] on the host
    first_id = int(ids[0]) if ids.numel() else 0
    name = f"items/part-{env.rank:05d}.parquet"
    record = write_item_rows(f"{version_url}/{name}", cfg.data.dir, first_id, rows.numpy())
    parts = gather_parts(name, record)  # also the barrier: every part is written
    if distributed():
        # Rank 0 finishes alone: the index build may outlast any collective timeout, so the
        # other ranks leave now and rank 0 takes their cores.
        shutdown()
        if env.is_main:
            use_every_core()
    if not env.is_main:
        return None
    source = run_source(run_dir, cfg, digest, mtime)
    return write_version(
        out, version_url, parts, encoder.cpu(), cfg.model, cfg.data.max_len,
        cfg.train.eval_protocol, source, faiss_kind, cfg.data.dir, target_recall, tune_users,
    )  # fmt: skip


def claim_export(out: str) -> Lease:
    """Take the export location ``out`` for this job (rank 0): its lease (another export
    writing there is refused, naming it), then its ownership: a new or empty directory is
    marked as ours; one with our marker, or an export of ours from before the marker (``CURRENT``
    and ``versions/``), is ours; anything else is refused, nothing in it changed."""
    lease = Lease(out, "export", "--out (export.out)").acquire()
    if lease.note:
        print(lease.note, file=sys.stderr, flush=True)
    fs, path = url_to_fs(out)
    names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path)} if fs.isdir(path) else set()
    if not mark_owned(out, "export") and not {CURRENT, VERSIONS} <= names:
        lease.release()
        raise ExportError(
            f"export location {out} holds files this project did not write (no {OWNED} marker): "
            "refusing to write into it. Choose a new or empty directory (--out or "
            "export.out)"
        )
    return lease


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir")
    parser.add_argument("--out", help="export URL (default: export.out, else <RUN_DIR>/export)")
    parser.add_argument("--faiss", choices=FAISS_KINDS,
                        help="index kind (default: export.faiss of the run's config)")  # fmt: skip
    parser.add_argument("--target-recall", type=float,
                        help="tune nprobe / efSearch to this recall@10 against exact search on "
                        "users' query vectors (default: the index's own setting)")  # fmt: skip
    parser.add_argument("--tune-users", type=int, default=2000,
                        help="users whose queries tune the search parameter")  # fmt: skip
    args = parser.parse_args(argv)
    if args.target_recall is not None and not 0 < args.target_recall <= 1:
        parser.error(f"--target-recall must be in (0, 1], got {args.target_recall}")
    if args.tune_users < 1:
        parser.error(f"--tune-users must be at least 1, got {args.tune_users}")
    quiet.install()  # the warnings we understand (mqsa_core/quiet.py), also under torchrun
    lease = None
    try:
        run_cfg = load_config(RunDir(args.run_dir).path("config.yaml"), fit=False).export
        out = args.out or run_cfg.out or RunDir(args.run_dir).path("export")
        if launch_env().rank == 0:
            lease = claim_export(out)
        manifest = export_run(args.run_dir, out, args.faiss or run_cfg.faiss,
                              args.target_recall, args.tune_users)  # fmt: skip
        shutdown()  # a world of one; a larger one left its process group in export_run
    except (UserError, CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if lease is not None:
            lease.release()
    if manifest is not None:
        print(f"exported {manifest.count} items x {manifest.dim} to {out} "
              f"(version {manifest.version})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
