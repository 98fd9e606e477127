"""Loading an export runs no code and serves nothing damaged: crafted pickles (in the old
torch.export program and in the new tensor file), files that do not match their manifest, a
pointer outside the export."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mqsa_ted.manifest import CURRENT, ENCODER, MANIFEST, ExportError
from mqsa_ted.recommend import Recommender, main
from tests.test_serving_queries import synthetic_export


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
