"""The scale rehearsal (``bench/scale_rehearsal.py``) end to end at a tiny size, and the ANN
search parameter it relies on: tuned by export, recorded in the manifest, set by recommend."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from mqsa_core.config import ModelConfig
from mqsa_ted.export import build_faiss, export_vectors, tune_search
from mqsa_ted.manifest import CURRENT, MANIFEST, ExportError, apply_search, read_manifest
from mqsa_ted.recommend import Recommender
from tests.synthetic import write_vocab
from trainer.model.encoder import MQSAEncoder

ROOT = Path(__file__).resolve().parents[1]
FINAL = re.compile(r"recall@10 (\d\.\d{4}) recall@100 (\d\.\d{4}) p99 (\d+\.\d{2}) ms")


def search_value(index) -> int:
    """The search parameter an IVF or HNSW index will use."""
    return int(index.nprobe) if isinstance(index, faiss.IndexIVF) else int(index.hnsw.efSearch)


def test_rehearsal_end_to_end_at_a_tiny_size(tmp_path):
    work = tmp_path / "rehearsal"
    command = [sys.executable, str(ROOT / "bench" / "scale_rehearsal.py"), "--events", "20000",
               "--items", "2000", "--users", "2000", "--workdir", str(work), "--local-spark",
               "--steps", "5", "--batch", "256", "--queries", "50", "--batch-users", "200",
               "--tune-users", "200", "--eval-users", "500"]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    final = FINAL.fullmatch(lines[-1])
    assert final, lines[-1]
    recall10, recall100, p99 = map(float, final.groups())
    assert recall10 >= 0.9 and recall100 >= 0.9 and p99 > 0
    for stage in (
        "synth",
        "prepare",
        "train",
        "export",
        "recommend: one query",
        "recommend: batch of 200",
    ):
        assert any(line.startswith(f"| {stage}") for line in lines), stage
    # exactly --steps steps (an epoch cut), one evaluation of a sample of --eval-users users
    figures = json.loads((work / "results.json").read_text())
    train = next(s for s in figures["stages"] if s["name"].startswith("train"))
    assert train["figures"]["steps"] == 5
    assert "a seeded sample of 500 of" in (work / "train.log").read_text()
    # the export tuned the search parameter to the target and wrote it into its manifest
    _, manifest = read_manifest(str(work / "export"))
    info = manifest.faiss
    assert info["kind"] == "hnsw" and info["target_recall"] == 0.96
    assert set(info["search"]) == {"efSearch"} and info["recall@10"] >= 0.96
    # recommend searched with it
    results = json.loads((work / "results.json").read_text())
    served = next(s for s in results["stages"] if s["name"].startswith("recommend: one query"))
    assert served["figures"]["index"]["search"] == info["search"]
    assert search_value(Recommender(str(work / "export")).index) == info["search"]["efSearch"]


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_tuning_takes_the_smallest_value_that_reaches_the_target(kind):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3000, 16)).astype(np.float32)
    queries = rng.standard_normal((300, 16)).astype(np.float32)
    index, _ = build_faiss(vectors, kind)
    (name, least), (_, most) = [(*tune_search(index, vectors, queries, t)[0].items(),)[0]
                                for t in (0.0, 1.01)]  # fmt: skip
    assert least == (1 if kind == "ivf" else 10)  # anything reaches 0: the first value tried
    assert most == (index.nlist if kind == "ivf" else 3000)  # nothing reaches 1.01: the largest
    search, reached = tune_search(index, vectors, queries, 0.9)
    assert least < search[name] < most and search_value(index) == search[name]
    assert set(reached) == {"recall@10", "recall@100"} and min(reached.values()) >= 0.9


def rewrite_search(export: Path, search: dict) -> None:
    """Change the committed manifest's search parameter (and ``CURRENT``'s checksum of it)."""
    pointer = json.loads((export / CURRENT).read_text())
    path = export / "versions" / pointer["version"] / MANIFEST
    raw = json.loads(path.read_text())
    raw["faiss"]["search"] = search
    payload = json.dumps(raw).encode()
    path.write_bytes(payload)
    pointer["manifest_sha256"] = hashlib.sha256(payload).hexdigest()
    (export / CURRENT).write_text(json.dumps(pointer))


def test_recommend_searches_with_the_manifests_parameter(tmp_path):
    data, out = tmp_path / "data", tmp_path / "export"
    write_vocab(data, 2000)
    vectors = np.random.default_rng(1).standard_normal((2000, 16)).astype(np.float32)
    model = ModelConfig(dim=16, dropout=0.0)
    torch.manual_seed(0)
    manifest = export_vectors(str(out), str(data), vectors, MQSAEncoder(model, 10), model,
                              faiss_kind="ivf")  # fmt: skip
    built = manifest.faiss["search"]["nprobe"]  # the build's default, recorded
    assert search_value(Recommender(str(out), allow_stale=True).index) == built
    rewrite_search(out, {"nprobe": built + 3})
    rec = Recommender(str(out), allow_stale=True)
    assert search_value(rec.index) == built + 3
    assert rec.recommend([["item1", "item2"]], k=5)[0].items
    for bad in ({"nprobe": 0}, {"nprobe": 2.5}, {"efSearch": 16}, {"k_factor": 4}):
        rewrite_search(out, bad)
        with pytest.raises(ExportError, match="search parameter"):
            Recommender(str(out), allow_stale=True)
    with pytest.raises(ExportError, match="not a mapping"):
        apply_search(faiss.IndexFlatIP(4), [1], "x")
