"""Deleting only what we created: ownership markers, roots, and write errors that name the path
and the OS error."""

import errno
from collections.abc import Iterator

import fsspec
import pytest

from mqsa_core.errors import StorageError
from mqsa_core.storage import (
    OWNER_MARKER,
    is_owned,
    is_root,
    mark_owned,
    owner_of,
    remove_owned,
    write_failure,
)


@pytest.mark.parametrize(
    ("url", "root"),
    [
        ("/", True), ("//", True), ("/tmp/..", True), ("file:///", True), ("file://", True),
        ("s3://bucket/", True), ("s3://bucket", True), ("gs://b//", True),
        ("hdfs://namenode:8020/", True), ("memory://", True),
        ("/tmp/run", False), ("runs/a", False), ("file:///tmp/a", False),
        ("s3://bucket/runs", False), ("memory://x", False),
    ],
)  # fmt: skip
def test_roots_are_recognised(url, root):
    assert is_root(url) is root


@pytest.fixture(params=["local", "memory"])
def base(request, tmp_path) -> Iterator[str]:
    url = str(tmp_path) if request.param == "local" else f"memory://trust-{tmp_path.name}"
    yield url
    fs, path = fsspec.core.url_to_fs(url)
    if request.param == "memory" and fs.exists(path):
        fs.rm(path, recursive=True)


def put(url: str, text: str = "x") -> None:
    with fsspec.open(url, "w") as f:
        f.write(text)


def test_a_directory_we_did_not_create_is_never_deleted(base):
    theirs = f"{base}/theirs"
    put(f"{theirs}/precious.txt", "keep me")
    assert not mark_owned(theirs, "checkpoint")  # not empty, not ours: stays unmarked
    with pytest.raises(StorageError, match=f"refusing to delete {theirs}.*{OWNER_MARKER}"):
        remove_owned(theirs)
    with fsspec.open(f"{theirs}/precious.txt", "r") as f:
        assert f.read() == "keep me"


def test_what_we_created_is_marked_and_removed_whole(base):
    ours = f"{base}/ours"
    assert mark_owned(ours, "checkpoint", step=3)
    put(f"{ours}/ds/model.pt")
    marker = owner_of(ours)
    assert marker["owner"] == "mqsa-ted" and marker["kind"] == "checkpoint" and marker["step"] == 3
    assert mark_owned(ours, "checkpoint")  # marking again keeps the first marker
    assert owner_of(ours)["created"] == marker["created"]
    with pytest.raises(StorageError, match="of kind 'run'"):
        remove_owned(ours, "run")
    assert is_owned(ours, "checkpoint")
    remove_owned(ours, "checkpoint")
    fs, path = fsspec.core.url_to_fs(ours)
    assert not fs.exists(path)


def test_an_empty_existing_directory_can_be_claimed(tmp_path):
    (tmp_path / "empty").mkdir()
    assert mark_owned(str(tmp_path / "empty"), "run")
    assert is_owned(str(tmp_path / "empty"), "run")


def test_a_forged_or_foreign_marker_is_not_ours(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / OWNER_MARKER).write_text('{"owner": "someone-else"}')
    assert not is_owned(str(tmp_path / "d"))
    (tmp_path / "d" / OWNER_MARKER).write_text("not json")
    assert not is_owned(str(tmp_path / "d"))


def test_a_full_device_is_named(tmp_path):
    with pytest.raises(OSError) as err:
        with open("/dev/full", "wb") as f:  # every write: ENOSPC
            f.write(b"x")
    assert err.value.errno == errno.ENOSPC
    message = str(write_failure(str(tmp_path / "ckpt"), RuntimeError("save failed")))
    assert "cannot write" in message and "MiB free there" in message
    try:
        raise RuntimeError("enforce fail ... unexpected pos") from err.value
    except RuntimeError as wrapped:
        message = str(write_failure(str(tmp_path / "ckpt"), wrapped))
    assert message.startswith(f"cannot write {tmp_path / 'ckpt'}: No space left on device")
