"""Loading an export runs no code and serves nothing damaged: crafted pickles (in the old
torch.export program, in the new tensor file, in a run's model.pt), files that do not match
their manifest, a pointer outside the export, symbolic links anywhere inside it."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mqsa_core.config import ModelConfig
from mqsa_ted.export import export_vectors
from mqsa_ted.manifest import CURRENT, ENCODER, MANIFEST, OWNER_MARKER, ExportError, load_tensors
from mqsa_ted.recommend import Recommender, main
from tests.test_serving_queries import DIM, MAX_LEN, synthetic_export
from trainer.model.encoder import MQSAEncoder

ROOT = Path(__file__).resolve().parents[1]


class WritesMarker:
    """Unpickling this object calls ``open(path, "w")``: the file appears only if code ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def crafted_pt2(marker: Path) -> bytes:
    """A genuine ``torch.export.save`` archive whose sample inputs are a pickle that writes
    ``marker``: ``torch.export.load`` falls back to unpickling it."""

    class Tiny(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + 1

    saved = io.BytesIO()
    torch.export.save(torch.export.export(Tiny(), (torch.zeros(1),)), saved)
    evil = io.BytesIO()
    torch.save({"inputs": WritesMarker(marker)}, evil)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(saved.getvalue())) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            dst.writestr(info, evil.getvalue() if "sample_inputs" in info.filename else data)
    return out.getvalue()


def version_dir(export: str) -> Path:
    pointer = json.loads((Path(export) / CURRENT).read_text())
    return Path(export) / "versions" / pointer["version"]


def torch_saved(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def write_manifest(export: str, manifest: dict) -> None:
    """Write ``manifest`` into the current version and its sha256 into CURRENT."""
    version = version_dir(export)
    body = json.dumps(manifest).encode()
    (version / MANIFEST).write_bytes(body)
    pointer = {"version": version.name, "manifest_sha256": hashlib.sha256(body).hexdigest()}
    (Path(export) / CURRENT).write_text(json.dumps(pointer))


def rewrite(export: str, name: str, payload: bytes) -> None:
    """Replace ``name`` in the current version AND every checksum that covers it (its manifest
    entry, the manifest's sha256 in CURRENT), as a careful attacker would."""
    version = version_dir(export)
    (version / name).write_bytes(payload)
    manifest = json.loads((version / MANIFEST).read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}
    write_manifest(export, manifest)


# the crafted pickles use protocol 4; torch warns that its weights-only unpickler expects 2
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_crafted_exports_run_no_code(tmp_path):
    marker = tmp_path / "code-ran"
    # an export in the old layout (manifest.json at the top, a torch.export user_encoder.pt2)
    old = tmp_path / "old"
    (old / "items").mkdir(parents=True)
    items = {"item_id": ["i0", "i1"], "index": [0, 1], "vector": [[0.0, 1.0], [1.0, 0.0]]}
    pq.write_table(pa.table(items), old / "items" / "part-0.parquet")
    (old / MANIFEST).write_text(json.dumps({
        "dim": 2, "count": 2, "dtype": "float32", "metric": "inner_product", "max_len": 4,
        "source_run": "", "checkpoint": "", "config_hash": "", "faiss": None,
    }))  # fmt: skip
    (old / "user_encoder.pt2").write_bytes(crafted_pt2(marker))
    with pytest.raises(ExportError, match="older export format|never loaded"):
        Recommender(str(old))
    assert not marker.exists()

    # the current layout with every checksum updated: the tensor file itself is the attack
    export, _ = synthetic_export(tmp_path / "new")
    saved = torch_saved({"w": WritesMarker(marker)})
    for payload in (saved, pickle.dumps(WritesMarker(marker))):
        rewrite(export, ENCODER, payload)
        with pytest.raises(ExportError, match="not a weights-only tensor file"):
            Recommender(export)
        assert main([export, "--history", "i1"]) == 2
        assert not marker.exists()
    # the payload is live: an unsafe load would have run it
    torch.load(io.BytesIO(saved), weights_only=False)
    assert marker.exists()


def test_files_that_do_not_match_the_manifest_are_refused(tmp_path):
    export, _ = synthetic_export(tmp_path)
    version = version_dir(export)
    part = version / "items" / "part-00000.parquet"
    good = part.read_bytes()
    part.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])
    with pytest.raises(ExportError, match="does not match the sha256"):
        Recommender(export)
    part.write_bytes(good)
    manifest = version / MANIFEST
    manifest.write_text(manifest.read_text().replace('"max_len": 8', '"max_len": 9'))
    with pytest.raises(ExportError, match="does not match the sha256 in CURRENT"):
        Recommender(export)


@pytest.mark.parametrize("version", ["../../elsewhere", "a/b", ""])
def test_current_names_only_a_version_directory(tmp_path, version):
    export, _ = synthetic_export(tmp_path)
    (Path(export) / CURRENT).write_text(json.dumps({"version": version}))
    with pytest.raises(ExportError, match="does not name a version"):
        Recommender(export)


def test_unexpected_manifest_keys_are_refused(tmp_path):
    export, _ = synthetic_export(tmp_path)
    manifest = json.loads((version_dir(export) / MANIFEST).read_text())
    write_manifest(export, {**manifest, "__reduce__": "os.system"})
    with pytest.raises(ExportError, match="unexpected manifest keys"):
        Recommender(export)
    manifest["files"]["../../../etc/passwd"] = {"sha256": "0"}
    write_manifest(export, manifest)
    with pytest.raises(ExportError, match="outside the version directory"):
        Recommender(export)


def rehash(export: str, name: str) -> None:
    """Record in the manifest (and CURRENT) the sha256 of what ``name`` reads as now, through a
    link if it is one: an attacker who can write the export can always do this."""
    payload = (version_dir(export) / name).read_bytes()
    manifest = json.loads((version_dir(export) / MANIFEST).read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}
    write_manifest(export, manifest)


def relink(path: Path, target: Path) -> None:
    """Move ``path`` (a file or directory) to ``target`` and leave a symbolic link to it."""
    path.rename(target)
    path.symlink_to(target)


PART = "items/part-00000.parquet"


def link_part_to_a_copy(export: str, outside: Path) -> Path:
    part = version_dir(export) / PART
    relink(part, outside / "part.parquet")  # the same bytes: its sha256 still matches
    return part


def link_part_to_passwd(export: str, outside: Path) -> Path:
    part = version_dir(export) / PART
    passwd = outside / "passwd"
    passwd.write_text("root:x:0:0:root:/root:/bin/bash\n")
    part.unlink()
    part.symlink_to(passwd)
    rehash(export, PART)
    return part


def link_items_directory(export: str, outside: Path) -> Path:
    items = version_dir(export) / "items"
    relink(items, outside / "items")
    return items


def link_version_directory(export: str, outside: Path) -> Path:
    version = version_dir(export)
    relink(version, outside / version.name)
    return version


def link_current(export: str, outside: Path) -> Path:
    current = Path(export) / CURRENT
    relink(current, outside / CURRENT)
    return current


@pytest.mark.parametrize(
    "attack",
    [link_part_to_a_copy, link_part_to_passwd, link_items_directory, link_version_directory,
     link_current],
    ids=lambda attack: attack.__name__,
)  # fmt: skip
def test_links_inside_an_export_are_refused_in_one_line(tmp_path, capsys, attack):
    export, _ = synthetic_export(tmp_path / "export")
    assert main([export, "--history", "i1,i2", "--k", "3"]) == 0
    capsys.readouterr()
    outside = tmp_path / "outside"
    outside.mkdir()
    link = attack(export, outside)
    with pytest.raises(ExportError, match="is a symbolic link: an export is read only from its"):
        Recommender(export)
    assert main([export, "--history", "i1,i2", "--k", "3"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        f"error: {link} is a symbolic link: an export is read only from its own files, never "
        "through a link"
    ]


def test_a_rehashed_part_that_is_not_parquet_is_one_line(tmp_path, capsys):
    export, _ = synthetic_export(tmp_path)
    rewrite(export, PART, b"root:x:0:0:root:/root:/bin/bash\n")
    assert main([export, "--history", "i1"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {version_dir(export) / PART} is not a Parquet file (")


def test_export_deletes_no_version_through_a_link(tmp_path):
    """An older-looking version that is a link to someone's directory (even one holding our
    marker) is neither followed nor deleted when a new version is committed."""
    export, vectors = synthetic_export(tmp_path)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / OWNER_MARKER).write_text("copied by hand\n")
    (theirs / "notes.txt").write_text("keep me\n")
    link = Path(export) / "versions" / "00000000T000000000000-00000000"  # sorts first: "older"
    link.symlink_to(theirs)
    model = ModelConfig(dim=DIM, dropout=0.0)
    export_vectors(export, str(tmp_path / "data"), vectors, MQSAEncoder(model, MAX_LEN), model)
    assert link.is_symlink() and (theirs / "notes.txt").read_text() == "keep me\n"
    assert sorted(p.name for p in (Path(export) / "versions").iterdir()) == [
        link.name, version_dir(export).name
    ]  # fmt: skip


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize(
    "kind, start",
    [
        ("torch.save", "was refused as unsafe: it is not a weights-only tensor file (it holds a "
         "reference to io.open, and loading that could run code)"),
        ("pickle", "was refused as unsafe: it is not a weights-only tensor file (it holds more "
         "than tensors and plain containers"),
        ("csv", "was refused as unsafe"),  # the weights-only loader reads no other bytes
        ("damaged zip", "is not a torch tensor file (damaged or truncated? RuntimeError)"),
    ],
)  # fmt: skip
def test_tensor_files_refused_never_suggest_an_unsafe_load(tmp_path, kind, start):
    marker = tmp_path / "code-ran"
    payload = {
        "torch.save": torch_saved({"w": WritesMarker(marker)}),
        "pickle": pickle.dumps(WritesMarker(marker)),
        "csv": b"name,count\na,1\n",
        "damaged zip": torch_saved({"w": torch.zeros(2)})[:-40],
    }[kind]
    with pytest.raises(ExportError) as refused:
        load_tensors(payload, "run/model.pt", "export a run you trained")
    message = str(refused.value)
    assert len(message.splitlines()) == 1 and "weights_only=False" not in message
    assert message.startswith(f"run/model.pt {start}"), message
    assert message.endswith("; export a run you trained") and not marker.exists()


def test_export_of_a_crafted_model_pt_is_refused_as_unsafe(tmp_path):
    """``mqsa-ted export`` of a run whose ``model.pt`` is a pickle that would run code: one
    ``error:`` line saying it was refused as unsafe (torch's advice to load it with
    ``weights_only=False`` is not passed on), exit 2, nothing run, nothing exported."""
    marker = tmp_path / "code-ran"
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"data:\n  dir: {tmp_path / 'data'}\n")
    (run / "model.pt").write_bytes(torch_saved({"table.weight": WritesMarker(marker)}))
    proc = subprocess.run(
        [sys.executable, "-m", "mqsa_ted.cli", "export", str(run)], cwd=ROOT, capture_output=True,
        text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [
        f"error: {run / 'model.pt'} was refused as unsafe: it is not a weights-only tensor file "
        "(it holds a reference to io.open, and loading that could run code), so it is never "
        "loaded; this trainer did not write it; export a run you trained"
    ]
    assert "weights_only=False" not in proc.stdout + proc.stderr
    assert not marker.exists() and not (run / "export" / CURRENT).exists()  # nothing exported
