"""Export a trained run for retrieval: item vectors, the user encoder, a FAISS index.

    python -m embeddings.export RUN_DIR [--out URL] [--faiss auto|flat|ivf|hnsw|none]

Writes under ``--out`` (default ``<RUN_DIR>/export``):

- ``items/part-*.parquet``: ``item_id`` (raw id), ``index`` (row), ``vector`` (list<float32>[D]);
- ``user_encoder.pt2``: a ``torch.export`` program mapping a ``[B, M]`` right-aligned history of
  item rows (padding = N) to ``[B, D]`` query vectors. torch.export was chosen over TorchScript
  (deprecated) and ONNX (an extra runtime and opset pinning): it loads with plain torch,
  keeps the batch dimension dynamic, and reproduces the trainer's numbers exactly;
- ``faiss.index`` (optional) with its recall@10 against exact search printed;
- ``manifest.json`` last: the commit marker. A directory without it is an unfinished export,
  and ``recommend`` refuses it.
"""

from __future__ import annotations

import argparse
import io
import sys
import time

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from embeddings.manifest import MANIFEST, ExportError, Manifest
from trainer.config import config_hash, load_config
from trainer.data import read_table
from trainer.model import MQSAEncoder
from trainer.run_dir import RunDir, atomic_write_bytes, load_state, write_json


class UserEncoder(nn.Module):
    """History of item rows ``[B, M]`` (right-aligned, padding id N) -> query vectors ``[B, D]``."""

    def __init__(self, encoder: MQSAEncoder, table: torch.Tensor) -> None:
        super().__init__()
        self.encoder = encoder
        self.register_buffer("table", table)  # [N + 1, D], row N = 0

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        emb = self.table[history]  # [B, M, D]
        return self.encoder(emb, history != self.table.shape[0] - 1)[:, -1]


def load_trained(run_dir: str):
    """``(cfg, encoder, table [N + 1, D])`` of a run's best-validation weights (``model.pt``)."""
    run = RunDir(run_dir)
    cfg = load_config(run.path("config.yaml"))
    try:
        state = load_state(run.path("model.pt"))
    except FileNotFoundError as e:
        raise ExportError(f"{run.path('model.pt')} not found: has the run finished?") from e
    table = state.pop("table.weight")
    encoder = MQSAEncoder(cfg.model, cfg.data.max_len)
    encoder_state = {k.removeprefix("encoder."): v for k, v in state.items()}
    try:
        encoder.load_state_dict(encoder_state)
    except RuntimeError as e:
        raise ExportError(f"{run.path('model.pt')} does not match config.yaml: {e}") from e
    return cfg, encoder.eval(), table


def read_vocab(data_dir: str) -> tuple[list, np.ndarray]:
    """Raw item ids in row order and their rows, from ``<data_dir>/vocab``."""
    vocab = read_table(data_dir.rstrip("/") + "/vocab", ["item_id", "index"]).sort_by("index")
    return vocab.column("item_id").to_pylist(), vocab.column("index").to_numpy()


def build_faiss(vectors: np.ndarray, kind: str):
    """A FAISS inner-product index: exact for small catalogues, HNSW or IVF for large ones."""
    import faiss

    n, dim = vectors.shape
    if kind == "auto":
        kind = "flat" if n <= 200_000 else "hnsw"
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = 128
    else:
        nlist = max(1, int(4 * np.sqrt(n)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors[np.random.default_rng(0).choice(n, min(n, 64 * nlist), replace=False)])
        index.nprobe = max(1, nlist // 16)
    index.add(vectors)
    return index, kind


def faiss_recall_at_10(index, vectors: np.ndarray, queries: np.ndarray) -> float:
    """Recall@10 of ``index`` against exact inner-product search for ``queries`` ``[Q, D]``."""
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    _, approx = index.search(queries, 10)
    hits = sum(len(set(a) & set(e)) for a, e in zip(approx, exact, strict=True))
    return hits / exact.size


def export_run(run_dir: str, out: str, faiss_kind: str = "auto") -> Manifest:
    """Write the export of ``run_dir`` to ``out`` (see the module docstring)."""
    cfg, encoder, table = load_trained(run_dir)
    raw_ids, rows = read_vocab(cfg.data.dir)
    num_items = table.shape[0] - 1
    if len(raw_ids) != num_items:
        raise ExportError(
            f"vocab of {cfg.data.dir} has {len(raw_ids)} items but the model has {num_items}"
        )
    fs, path = fsspec.core.url_to_fs(out)
    if fs.exists(f"{path}/{MANIFEST}"):
        fs.rm(f"{path}/{MANIFEST}")  # the old export stops looking complete before we overwrite
    fs.makedirs(f"{path}/items", exist_ok=True)
    vectors = table[:num_items].numpy().astype(np.float32)
    item_rows = pa.table(
        {
            "item_id": raw_ids,
            "index": pa.array(rows, pa.int64()),
            "vector": pa.FixedSizeListArray.from_arrays(
                pa.array(vectors[rows].ravel()), cfg.model.dim
            ),
        }
    )
    with fs.open(f"{path}/items/part-00000.parquet", "wb") as f:
        pq.write_table(item_rows, f)
    history = torch.full((2, cfg.data.max_len), num_items, dtype=torch.int64)
    batch = torch.export.Dim("batch", min=1, max=1 << 24)
    program = torch.export.export(
        UserEncoder(encoder, table), (history,), dynamic_shapes={"history": {0: batch}}
    )
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    atomic_write_bytes(f"{out}/user_encoder.pt2", buffer.getvalue())
    faiss_info = None
    if faiss_kind != "none":
        import faiss

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
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {manifest.count} items x {manifest.dim} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
