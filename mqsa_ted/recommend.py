"""Top-K recommendations from an export, for one history or a Parquet file of histories.

    python -m mqsa_ted.recommend EXPORT_DIR --history id1,id2,... [--k 10]
    python -m mqsa_ted.recommend EXPORT_DIR --batch histories.parquet --out recs.parquet

The history is given oldest first, as raw item ids. Unknown ids are reported and skipped; the
history's own items are never recommended.
"""

from __future__ import annotations

import argparse
import io
import sys
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from core.storage import read_parquet
from mqsa_ted.manifest import ExportError, Manifest


@dataclass
class Recommendations:
    items: list  # raw ids, best first
    scores: list[float]
    unknown: list[str]  # history ids not in the catalogue (skipped)


class Recommender:
    """Loads an export once and answers top-K queries."""

    def __init__(self, export_dir: str) -> None:
        self.manifest = Manifest.read(export_dir)
        table = read_parquet(f"{export_dir.rstrip('/')}/items", ["item_id", "index", "vector"])
        rows = table.column("index").to_numpy()
        order = np.argsort(rows)
        self.raw_ids = [table.column("item_id").to_pylist()[i] for i in order]
        flat = table.column("vector").combine_chunks().values.to_numpy()
        self.vectors = torch.from_numpy(flat.reshape(-1, self.manifest.dim)[order].copy())
        self.row_of = {str(raw): row for row, raw in enumerate(self.raw_ids)}
        with fsspec.open(f"{export_dir.rstrip('/')}/user_encoder.pt2", "rb") as f:
            self.encoder = torch.export.load(io.BytesIO(f.read())).module()

    @property
    def padding(self) -> int:
        return len(self.raw_ids)

    def encode(self, histories: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor, list]:
        """Raw-id histories -> (right-aligned rows ``[B, M]``, queries ``[B, D]``, unknown ids)."""
        m = self.manifest.max_len
        rows = torch.full((len(histories), m), self.padding, dtype=torch.int64)
        unknown = []
        for b, history in enumerate(histories):
            known = [self.row_of[str(i)] for i in history if str(i) in self.row_of]
            unknown.append([str(i) for i in history if str(i) not in self.row_of])
            if known:
                rows[b, -len(known[-m:]) :] = torch.tensor(known[-m:])
        vectors = torch.cat([self.vectors, self.vectors.new_zeros(1, self.vectors.shape[1])])
        with torch.no_grad():
            return rows, self.encoder(vectors[rows], rows != self.padding), unknown

    def recommend(self, histories: list[list[str]], k: int = 10) -> list[Recommendations]:
        rows, queries, unknown = self.encode(histories)
        scores = queries @ self.vectors.T  # [B, N]
        scores = torch.cat([scores, scores.new_zeros(len(histories), 1)], dim=1)
        scores.scatter_(1, rows, float("-inf"))  # the history (and the padding column)
        top = scores[:, : self.padding].topk(min(k, self.padding), dim=1)
        return [
            Recommendations([self.raw_ids[i] for i in idx.tolist()], val.tolist(), unk)
            for idx, val, unk in zip(top.indices, top.values, unknown, strict=True)
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--history", help="comma-separated raw item ids, oldest first")
    source.add_argument("--batch", help="Parquet with columns user_id, history (list of raw ids)")
    parser.add_argument("--out", help="output Parquet for --batch (default: print)")
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args(argv)
    try:
        rec = Recommender(args.export_dir)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.history is not None:
        (result,) = rec.recommend(
            [[s.strip() for s in args.history.split(",") if s.strip()]], args.k
        )
        if result.unknown:
            print(f"skipped unknown item ids: {', '.join(result.unknown)}", file=sys.stderr)
        for rank, (item, score) in enumerate(zip(result.items, result.scores, strict=True), 1):
            print(f"{rank:3d}  {item}  {score:.4f}")
        return 0
    with fsspec.open(args.batch, "rb") as f:
        histories = pq.read_table(f, columns=["user_id", "history"])
    results = rec.recommend(histories.column("history").to_pylist(), args.k)
    skipped = sum(len(r.unknown) for r in results)
    if skipped:
        print(f"skipped {skipped} unknown item ids", file=sys.stderr)
    out = pa.table(
        {
            "user_id": histories.column("user_id"),
            "items": [[str(i) for i in r.items] for r in results],
            "scores": [r.scores for r in results],
        }
    )
    if args.out:
        with fsspec.open(args.out, "wb") as f:
            pq.write_table(out, f)
        print(f"wrote {out.num_rows} rows to {args.out}")
    else:
        print(out.to_pandas().to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
