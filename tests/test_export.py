"""Export round trip: vectors, user encoder and recommendations agree with the trainer."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from core.config import load_config
from mqsa_ted.export import export_run, load_trained
from mqsa_ted.manifest import ExportError
from mqsa_ted.recommend import Recommender
from tests.synthetic import write_prepared
from trainer.batches import trim
from trainer.data import load_sequences
from trainer.evaluate import EvalSplit, target_ranks

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    data = write_prepared(root / "data")
    config = root / "tiny.yaml"
    config.write_text(
        f"data:\n  dir: {data}\n  max_len: 12\nmodel:\n  dim: 16\n"
        f"train:\n  epochs: 2\n  batch_size: 32\n  run_dir: {root / 'run'}\n  progress: false\n"
    )
    proc = subprocess.run([sys.executable, "-m", "trainer.train", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run"


def test_export_round_trip(trained_run, tmp_path):
    out = tmp_path / "export"
    manifest = export_run(str(trained_run), str(out), faiss_kind="flat")
    assert manifest.count == 40 and manifest.dim == 16 and manifest.faiss["recall@10"] == 1.0
    cfg, encoder, table = load_trained(str(trained_run))
    items = pq.read_table(out / "items").sort_by("index")
    vectors = np.stack(items.column("vector").to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(vectors, table.all_items().detach().numpy())
    assert items.column("item_id").to_pylist() == [f"i{k}" for k in range(40)]

    seqs = load_sequences(cfg)
    inputs = trim(seqs.test_inputs(), seqs.num_items)
    with torch.no_grad():
        want = encoder(table.lookup(inputs), inputs != seqs.num_items)[:, -1]
    rec = Recommender(str(out))
    full = seqs.test_inputs()
    with torch.no_grad():
        got = rec.encoder(table.lookup(full), full != seqs.num_items)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    # recommend() on a user's full history = the evaluation ranking's top-10 for that user
    user = int((seqs.train != seqs.num_items).sum(1).argmin())  # short history: nothing cut
    history = [i for i in seqs.train[user].tolist() if i != seqs.num_items] + [
        int(seqs.valid[user])
    ]
    (result,) = rec.recommend([[f"i{i}" for i in history] + ["not-an-item"]], k=10)
    assert result.unknown == ["not-an-item"]
    items_t = table.all_items().detach()
    mask_rows, mask_items = torch.zeros(len(history), dtype=torch.int64), torch.tensor(history)
    no = torch.tensor([False])
    ranks = torch.stack(
        [target_ranks(want[user : user + 1], items_t,
                      EvalSplit(None, torch.tensor([j]), mask_rows, mask_items, no), 64)[0]
         for j in range(40) if j not in history]
    )  # fmt: skip
    candidates = [j for j in range(40) if j not in history]
    top10 = [f"i{candidates[i]}" for i in torch.argsort(ranks)[:10].tolist()]
    assert result.items == top10


def test_unfinished_export_is_refused(trained_run, tmp_path):
    out = tmp_path / "export"
    export_run(str(trained_run), str(out), faiss_kind="none")
    (out / "manifest.json").unlink()  # as if the export died before its commit marker
    with pytest.raises(ExportError, match="not a finished export"):
        Recommender(str(out))


def test_missing_run_is_a_clear_error(tmp_path):
    cfg_dir = tmp_path / "run"
    cfg_dir.mkdir()
    (cfg_dir / "config.yaml").write_text(load_config(None).to_yaml())
    with pytest.raises(ExportError, match="model.pt not found"):
        export_run(str(cfg_dir), str(tmp_path / "out"))


def test_report_compares_model_and_baselines(trained_run, tmp_path):
    from mqsa_ted.report import write_report

    out = tmp_path / "export"
    export_run(str(trained_run), str(out), faiss_kind="none")
    report = write_report(str(trained_run), str(out), num_users=3)
    assert "| MQSA-TED (epoch" in report and "| most popular |" in report
    assert "| last item -> most frequent next |" in report
    assert report.count("- history (last 5)") == 3
    png = (trained_run / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert (trained_run / "report.md").read_text() == report


def test_torchrec_run_exports_per_rank(tmp_path):
    data = write_prepared(tmp_path / "data")
    config = tmp_path / "tiny.yaml"
    config.write_text(
        f"data:\n  dir: {data}\n  max_len: 12\nmodel:\n  dim: 16\n"
        "embeddings:\n  backend: torchrec\n"
        f"train:\n  epochs: 2\n  batch_size: 32\n  run_dir: {tmp_path / 'run'}\n  progress: false\n"
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:0"]  # fmt: skip
    export = ["-m", "mqsa_ted.export", str(tmp_path / "run"), "--out"]
    for cmd in (
        [*torchrun, "-m", "trainer.train", str(config)],
        [*torchrun, *export, str(tmp_path / "two")],
        [sys.executable, *export, str(tmp_path / "one")],
    ):
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{cmd}\n{proc.stderr[-3000:]}"
    parts = sorted(p.name for p in (tmp_path / "two" / "items").iterdir())
    assert parts == ["part-00000.parquet", "part-00001.parquet"]  # each rank wrote its rows
    halves = [pq.read_table(tmp_path / "two" / "items" / p).num_rows for p in parts]
    assert sum(halves) == 40 and min(halves) > 0
    two = pq.read_table(tmp_path / "two" / "items").sort_by("index")
    one = pq.read_table(tmp_path / "one" / "items").sort_by("index")
    assert two.column("item_id").to_pylist() == [f"i{k}" for k in range(40)]
    assert two.column("vector").to_pylist() == one.column("vector").to_pylist()
    (result,) = Recommender(str(tmp_path / "two")).recommend([["i1", "i2"]], k=5)
    assert len(result.items) == 5 and not {"i1", "i2"} & set(result.items)
