"""Export a trained run for retrieval: item vectors, the user encoder, a FAISS index.

    python -m mqsa_ted.export RUN_DIR [--out URL] [--faiss auto|flat|ivf|hnsw|none]
    torchrun --nproc_per_node=2 -m mqsa_ted.export RUN_DIR ...   # TorchRec runs: per rank

Writes under ``--out`` (default ``<RUN_DIR>/export``):

- ``items/part-RRRRR.parquet``: ``item_id`` (raw id), ``index`` (row), ``vector``
  (list<float32>[D]); each rank writes the rows it holds (its shard of a TorchRec table):
  the table is never gathered onto one rank;
- ``user_encoder.pt2``: a ``torch.export`` program mapping the history's item vectors
  ``[B, M, D]`` (right-aligned, zeros at padding) and mask ``[B, M]`` to ``[B, D]`` query
  vectors. torch.export was chosen over TorchScript
  (deprecated) and ONNX (an extra runtime and opset pinning): it loads with plain torch,
  keeps the batch dimension dynamic, and reproduces the trainer's numbers exactly;
- ``faiss.index`` (optional) with its recall@10 against exact search printed;
- ``manifest.json`` last: the commit marker. A directory without it is an unfinished export,
  and ``recommend`` refuses it.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
import uuid

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import nn

from core.collectives import barrier
from core.config import Config, config_hash, load_config
from core.prepared import VOCAB, read_dataset, read_stats
from core.storage import atomic_write_bytes, load_state, read_parquet, write_json
from embeddings.base import ItemTable
from embeddings.factory import build_item_table
from mqsa_ted.manifest import MANIFEST, ExportError, Manifest
from trainer.checkpoint import CheckpointError, load_best_table
from trainer.distributed import init_distributed, shutdown
from trainer.model import MQSAEncoder
from trainer.run_dir import RunDir


class UserEncoder(nn.Module):
    """History vectors ``[B, M, D]`` (right-aligned, zero rows at padding) and their mask
    ``[B, M]`` -> query vectors ``[B, D]``. The serving side looks the history's item vectors up
    in the exported table, so the program stays small whatever the catalogue size."""

    def __init__(self, encoder: MQSAEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(history, mask, last_only=True)[:, -1]


def load_trained(
    run_dir: str, device: torch.device | str = "cpu"
) -> tuple[Config, MQSAEncoder, ItemTable]:
    """``(cfg, encoder, table)`` with a run's best-validation weights.

    The dense backend's table comes from ``model.pt``; a TorchRec table is rebuilt with the
    current world size and loaded from the run's ``best_table-e*`` snapshot (each rank its
    shard), so this is collective under torchrun.
    """
    run = RunDir(run_dir)
    cfg = load_config(run.path("config.yaml"))
    try:
        state = load_state(run.path("model.pt"))
    except FileNotFoundError as e:
        raise ExportError(f"{run.path('model.pt')} not found: has the run finished?") from e
    num_items = int(read_stats(cfg.data.dir)["items"])
    table = build_item_table(cfg, num_items, device)
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


def raw_item_ids(data_dir: str, first: int, count: int) -> list:
    """Raw ids of rows ``first .. first + count - 1`` from ``<data_dir>/vocab`` (only those
    rows are read: a rank never holds the whole vocabulary)."""
    index = pc.field("index")
    table = read_dataset(
        data_dir, VOCAB, ["item_id", "index"], filter=(index >= first) & (index < first + count)
    ).sort_by("index")
    if table.num_rows != count:
        raise ExportError(f"{data_dir}/vocab lacks rows {first}..{first + count - 1}: wrong vocab?")
    return table.column("item_id").to_pylist()


def read_vocab(data_dir: str) -> list:
    """All raw item ids in row order (small catalogues: reports and tests)."""
    return raw_item_ids(data_dir, 0, int(read_stats(data_dir)["items"]))


def read_vectors(items_url: str, dim: int) -> np.ndarray:
    """All vectors of an export's ``items/`` in row order: ``[N, D]`` float32."""
    table = read_parquet(items_url, ["index", "vector"]).sort_by("index")
    flat = table.column("vector").combine_chunks().values.to_numpy()
    return flat.reshape(-1, dim).astype(np.float32, copy=False)


def write_item_rows(
    url: str, data_dir: str, first_id: int, vectors: np.ndarray, chunk: int = 1 << 20
) -> None:
    """One Parquet part of rows ``first_id ..``: ``item_id`` (raw, from ``<data_dir>/vocab``),
    ``index``, ``vector`` (list<float32>[D]). Written ``chunk`` rows at a time into a temporary
    file that is renamed into place, so memory stays at one chunk beyond ``vectors``."""
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    writer = None
    with fs.open(tmp, "wb") as f:
        for start in range(0, max(len(vectors), 1), chunk):
            part = vectors[start : start + chunk]
            table = pa.table(
                {
                    "item_id": raw_item_ids(data_dir, first_id + start, len(part)),
                    "index": pa.array(np.arange(first_id + start, first_id + start + len(part))),
                    "vector": pa.FixedSizeListArray.from_arrays(
                        pa.array(part.ravel()), part.shape[1]
                    ),
                }
            )
            writer = writer or pq.ParquetWriter(f, table.schema)
            writer.write_table(table)
        writer.close()
    fs.mv(tmp, path)


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


def faiss_recall_at_10(index, vectors: np.ndarray, queries: np.ndarray) -> float:
    """Recall@10 of ``index`` against exact inner-product search for ``queries`` ``[Q, D]``
    (the exact search is FAISS's blocked flat scan: no ``[Q, N]`` matrix)."""
    import faiss

    exact_index = faiss.IndexFlatIP(vectors.shape[1])
    exact_index.add(vectors)
    _, exact = exact_index.search(queries, 10)
    _, approx = index.search(queries, 10)
    hits = sum(len(set(a) & set(e)) for a, e in zip(approx, exact, strict=True))
    return hits / exact.size


def export_run(run_dir: str, out: str, faiss_kind: str = "auto") -> Manifest | None:
    """Write the export of ``run_dir`` to ``out`` (see the module docstring); every rank writes
    the item rows it holds. Returns the manifest on rank 0, None elsewhere."""
    env = init_distributed()
    cfg, encoder, table = load_trained(run_dir, env.device)
    encoder = encoder.cpu()  # the exported program runs on the host
    fs, path = fsspec.core.url_to_fs(out)
    if env.is_main and fs.exists(f"{path}/{MANIFEST}"):
        fs.rm(f"{path}/{MANIFEST}")  # the old export stops looking complete before we overwrite
    barrier()
    ids, rows = table.export_rows()  # [C], [C, D] on the host
    first_id = int(ids[0]) if ids.numel() else 0
    part = f"{out}/items/part-{env.rank:05d}.parquet"
    write_item_rows(part, cfg.data.dir, first_id, rows.numpy())
    barrier()
    if not env.is_main:
        return None
    num_items = table.num_items
    history = torch.zeros(2, cfg.data.max_len, cfg.model.dim)
    mask = torch.ones(2, cfg.data.max_len, dtype=torch.bool)
    batch = torch.export.Dim("batch", min=1, max=1 << 24)
    program = torch.export.export(
        UserEncoder(encoder),
        (history, mask),
        dynamic_shapes={"history": {0: batch}, "mask": {0: batch}},
    )
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    atomic_write_bytes(f"{out}/user_encoder.pt2", buffer.getvalue())
    faiss_info = None
    if faiss_kind != "none":
        import faiss

        vectors = read_vectors(f"{out}/items", cfg.model.dim)
        start = time.perf_counter()
        index, kind = build_faiss(vectors, faiss_kind)
        build_s = time.perf_counter() - start
        sample = vectors[
            np.random.default_rng(0).choice(num_items, min(num_items, 1000), replace=False)
        ]
        recall = faiss_recall_at_10(index, vectors, sample)
        atomic_write_bytes(f"{out}/faiss.index", faiss.serialize_index(index).tobytes())
        faiss_info = {"kind": kind, "build_seconds": build_s, "recall@10": recall}
        print(f"faiss {kind}: built in {build_s:.2f} s, recall@10 vs exact {recall:.4f}")
    manifest = Manifest(
        dim=cfg.model.dim,
        count=num_items,
        dtype="float32",
        metric="inner_product",
        max_len=cfg.data.max_len,
        source_run=run_dir,
        checkpoint=RunDir(run_dir).path("model.pt"),
        config_hash=config_hash(cfg),
        faiss=faiss_info,
    )
    write_json(f"{out}/{MANIFEST}", manifest.to_dict())
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--out", help="export URL (default: export.out, else <RUN_DIR>/export)")
    parser.add_argument("--faiss", choices=["auto", "flat", "ivf", "hnsw", "none"],
                        help="index kind (default: export.faiss of the run's config)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        run_cfg = load_config(RunDir(args.run_dir).path("config.yaml")).export
        out = args.out or run_cfg.out or RunDir(args.run_dir).path("export")
        manifest = export_run(args.run_dir, out, args.faiss or run_cfg.faiss)
        shutdown()  # every rank waits here for rank 0's FAISS build and manifest
    except (ExportError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if manifest is not None:
        print(f"exported {manifest.count} items x {manifest.dim} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
