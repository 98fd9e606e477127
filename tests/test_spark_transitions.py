"""The transition graph equals a brute-force count over the train sequences."""

from __future__ import annotations

import pyarrow.dataset as ds
import pytest

from spark_jobs.synth import SynthSpec, write_log
from tests.conftest import read_output
from tests.reference import reference_split, reference_transitions

MAX_LEN = 4  # short, so that paper mode's cut changes the graph


@pytest.fixture(scope="module")
def log(tmp_path_factory) -> tuple[str, list[dict]]:
    """A small synthetic log and its rows in file order."""
    url = str(tmp_path_factory.mktemp("transitions") / "log")
    write_log(url, SynthSpec(events=3000, users=150, items=40, seed=11))
    return url, ds.dataset(url).to_table().to_pylist()


@pytest.mark.parametrize(
    ("time_span", "paper_mode", "top_k", "max_gap"),
    [(1, True, 0, 0.0), (2, True, 0, 0.0), (1, False, 0, 0.0), (2, False, 3, 0.0),
     (2, True, 0, 150_000.0)],
)  # fmt: skip
def test_transitions_equal_brute_force(log, tmp_path, run_prepare, time_span, paper_mode, top_k,
                                       max_gap):  # fmt: skip
    url, rows = log
    stats = run_prepare(
        url, time_span=time_span, paper_mode=paper_mode, max_len=MAX_LEN,
        top_k_successors=top_k, max_time_gap=max_gap,
    )  # fmt: skip
    out = str(tmp_path / "out")
    index = {v["item_id"]: v["index"] for v in read_output(out, "vocab").to_pylist()}
    ref = reference_split((r["user_id"], r["item_id"], r["timestamp"]) for r in rows)
    trains = [([index[i] for i in ref.items[u][:-2]], ref.times[u][:-2]) for u in ref.items]
    expected = reference_transitions(
        trains, time_span, MAX_LEN if paper_mode else None, max_gap, top_k
    )
    got = {(e["src"], e["dst"]): e["count"] for e in read_output(out, "transitions").to_pylist()}
    assert got == dict(expected)
    assert stats["num_transitions"] == len(expected)
    if top_k:
        assert max(sum(1 for s, _ in got if s == src) for src, _ in got) <= top_k
