"""Export round trip on a trained run: vectors, user encoder and recommendations agree with the
trainer; versions replace each other whole; a stale export is refused; the report; a 2-rank
export whose index build outlasts the collectives' timeout."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import mqsa_ted.export
import mqsa_ted.recommend
import mqsa_ted.report
from mqsa_core.config import load_config
from mqsa_core.lease import Lease
from mqsa_ted.export import export_run, load_trained
from mqsa_ted.manifest import CURRENT, ExportError, MissingExportError, read_manifest
from mqsa_ted.recommend import Recommender
from tests.reference_ranks import target_ranks
from tests.synthetic import write_prepared
from trainer.data.batches import trim
from trainer.data.sequences import load_sequences
from trainer.evaluation.evaluate import EvalSplit

ROOT = Path(__file__).resolve().parents[1]


def train(data: Path, run_dir: Path, *overrides: str) -> Path:
    """Train a tiny run into ``run_dir`` with ``python -m trainer.train``."""
    config = run_dir.parent / f"{run_dir.name}.yaml"
    config.write_text(
        f"data:\n  dir: {data}\n  max_len: 12\nmodel:\n  dim: 16\n"
        f"train:\n  epochs: 2\n  batch_size: 32\n  run_dir: {run_dir}\n  progress: false\n"
    )
    proc = subprocess.run([sys.executable, "-m", "trainer.train", str(config), *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    return train(write_prepared(root / "data"), root / "run")


def current_items(out: Path):
    """The item rows of the export version that CURRENT names, by row."""
    version, manifest = read_manifest(str(out))
    return pq.read_table(f"{version}/items").sort_by("index"), manifest


def test_export_round_trip(trained_run, tmp_path):
    out = tmp_path / "export"
    manifest = export_run(str(trained_run), str(out), faiss_kind="flat")
    assert manifest.count == 40 and manifest.dim == 16 and manifest.faiss["recall@10"] == 1.0
    cfg, encoder, table = load_trained(str(trained_run))
    items, _ = current_items(out)
    vectors = np.stack(items.column("vector").to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(vectors, table.all_items().detach().numpy())
    assert items.column("item_id").to_pylist() == [f"i{k}" for k in range(40)]

    seqs = load_sequences(cfg.data)
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


def test_failed_export_leaves_the_previous_one_whole(trained_run, tmp_path, monkeypatch):
    out = tmp_path / "export"
    first = export_run(str(trained_run), str(out), faiss_kind="flat")
    want = Recommender(str(out)).recommend([["i1", "i2"]], k=10)[0].items

    def dies(*args, **kwargs):
        raise OSError("injected: the disk filled up while the index was written")

    monkeypatch.setattr(mqsa_ted.export, "write_faiss", dies)  # after the item parts and encoder
    with pytest.raises(OSError, match="injected"):
        export_run(str(trained_run), str(out), faiss_kind="flat")
    versions = sorted(p.name for p in (out / "versions").iterdir())
    assert len(versions) == 2 and versions[0] == first.version  # the new one is unfinished
    assert (out / "versions" / versions[1] / "items" / "part-00000.parquet").exists()
    rec = Recommender(str(out))
    assert rec.manifest.version == first.version
    assert rec.recommend([["i1", "i2"]], k=10)[0].items == want

    monkeypatch.undo()
    foreign = out / "versions" / "0-not-ours"  # no ownership marker: never deleted
    foreign.mkdir()
    third = export_run(str(trained_run), str(out), faiss_kind="none")
    assert sorted(p.name for p in (out / "versions").iterdir()) == [foreign.name, third.version]
    items, manifest = current_items(out)
    assert items.num_rows == 40 and manifest.faiss is None
    (out / CURRENT).unlink()  # as if the very first export had died before its commit
    with pytest.raises(MissingExportError, match="run `mqsa-ted export"):
        Recommender(str(out))


def test_missing_run_is_a_clear_error(tmp_path):
    cfg_dir = tmp_path / "run"
    cfg_dir.mkdir()
    (cfg_dir / "config.yaml").write_text(load_config(None).to_yaml())
    with pytest.raises(ExportError, match="model.pt not found"):
        export_run(str(cfg_dir), str(tmp_path / "out"))


def test_report_before_export_is_a_clear_error(trained_run, tmp_path, capsys):
    out = tmp_path / "export"
    assert mqsa_ted.report.main([str(trained_run), "--export", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: no export at {out} yet: run `mqsa-ted export {trained_run} --out {out}` first"
    ]


def test_report_compares_model_and_baselines(trained_run, tmp_path):
    from mqsa_ted.report import write_report

    out = tmp_path / "export"
    export_run(str(trained_run), str(out), faiss_kind="none")
    report = write_report(str(trained_run), str(out), num_users=3)
    assert "| MQSA-TED (epoch" in report and "| most popular |" in report
    assert "| last item -> most frequent next |" in report
    assert "Evaluation protocol: paper (the whole train history is excluded" in report
    assert report.count("- history (last 5)") == 3
    png = (trained_run / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert (trained_run / "report.md").read_text() == report


def test_stale_export_is_refused_after_retraining(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    out = tmp_path / "export"
    export_run(str(run), str(out), faiss_kind="none")
    query = [str(out), "--history", "i1,i2", "--k", "3"]
    assert mqsa_ted.recommend.main(query) == 0
    capsys.readouterr()
    train(Path(load_config(str(run / "config.yaml")).data.dir), run, "train.seed=7",
          "train.resume=fresh")  # fmt: skip

    assert mqsa_ted.recommend.main(query) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"re-run `mqsa-ted export {run} --out {out}`" in err[0]
    assert mqsa_ted.report.main([str(run), "--export", str(out)]) == 2
    assert "--allow-stale" in capsys.readouterr().err
    assert mqsa_ted.recommend.main([*query, "--allow-stale"]) == 0
    export_run(str(run), str(out), faiss_kind="none")
    assert mqsa_ted.recommend.main(query) == 0
    assert json.loads((out / CURRENT).read_text())["version"] in str(read_manifest(str(out))[0])


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
    out = tmp_path / "export"
    export = ["-m", "mqsa_ted.export", str(tmp_path / "run"), "--out", str(out)]
    proc = subprocess.run([*torchrun, "-m", "trainer.train", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 2 ranks, rank 0's index build outlasting the collectives' timeout; then 1 in the same out
    threads = tmp_path / "threads"
    slow_export = [*torchrun, "tests/slow_index_export_worker.py", str(threads), *export[2:]]
    exports = []
    for cmd in (slow_export, [sys.executable, *export]):
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{cmd}\n{proc.stderr[-3000:]}"
        exports.append(current_items(out))
    cores = len(os.sched_getaffinity(0))
    assert threads.read_text() == f"{cores} {cores}"  # rank 0 built on every core, not torchrun's 1
    (two, two_manifest), (one, one_manifest) = exports
    assert two_manifest.parts == ["items/part-00000.parquet", "items/part-00001.parquet"]
    assert one_manifest.parts == ["items/part-00000.parquet"]  # no stale part of rank 1
    assert [p.name for p in (out / "versions").iterdir()] == [one_manifest.version]
    assert two.num_rows == one.num_rows == 40
    assert two.column("item_id").to_pylist() == [f"i{k}" for k in range(40)]
    assert two.column("vector").to_pylist() == one.column("vector").to_pylist()
    rec = Recommender(str(out))
    assert rec.index.ntotal == 40
    (result,) = rec.recommend([["i1", "i2"]], k=50)
    assert len(result.items) == 38 and not {"i1", "i2"} & set(result.items)


def test_an_export_location_of_someone_elses_files_or_in_use_is_refused(trained_run, tmp_path):
    """A folder of the user's is refused and left as it was; a location another export holds
    (its lease) is refused naming the holder; the lease is released after an export."""
    theirs = tmp_path / "my-vectors"
    theirs.mkdir()
    (theirs / "items.parquet").write_bytes(b"mine")
    cmd = [sys.executable, "-m", "mqsa_ted.export", str(trained_run), "--faiss", "none"]
    proc = subprocess.run([*cmd, "--out", str(theirs)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: export location {theirs} holds files this project did not write (no "
        ".mqsa-ted-owned marker): refusing to write into it. Choose a new or empty directory "
        "(--out or export.out)"
    ]
    assert [p.name for p in theirs.iterdir()] == ["items.parquet"]
    out = tmp_path / "export"
    with Lease(str(out), "export", "--out (export.out)"):
        proc = subprocess.run([*cmd, "--out", str(out)], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 2
        assert f"error: {out} is in use by another job: " in proc.stderr
    proc = subprocess.run([*cmd, "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / ".export.mqsa-ted-lease").exists()
