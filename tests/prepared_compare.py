"""Two committed prepare outputs compared row for row (the cloud tests check ``s3://`` and a
standalone cluster against local mode)."""

from __future__ import annotations

from mqsa_core.prepared import dataset_files
from tests.conftest import read_output

SORT_KEYS = {"vocab": ["index"], "sequences": ["user_id"], "transitions": ["src", "dst"]}


def assert_same_datasets(got: str, want: str) -> None:
    """``vocab/``, ``sequences/`` and ``transitions/`` of the output ``got`` hold the rows of
    ``want`` (compared in key order, so not the order within files) in as many files."""
    for name, keys in SORT_KEYS.items():
        assert len(dataset_files(got, name)) == len(dataset_files(want, name)), name
        order = [(key, "ascending") for key in keys]
        rows = read_output(got, name).sort_by(order)
        assert rows.num_rows > 0 and rows.equals(read_output(want, name).sort_by(order)), name
