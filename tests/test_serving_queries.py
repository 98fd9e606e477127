"""Serving queries on synthetic exports (written by our own export functions, no training):
history exclusion beyond max_len, k validation, unknown and empty histories, the popular
fallback, the evaluation protocol."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mqsa_core.config import ModelConfig
from mqsa_ted.export import export_vectors
from mqsa_ted.recommend import QueryError, Recommender, main
from tests.synthetic import write_prepared
from trainer.model.encoder import MQSAEncoder

DIM, MAX_LEN = 16, 8


def synthetic_export(
    root: Path, num_items: int = 300, faiss: str = "flat", protocol: str = "paper", seed: int = 0
) -> tuple[str, np.ndarray]:
    """An export of random unit vectors for the items ``i0..`` of a synthetic prepared-data
    directory, with a freshly initialised encoder; returns ``(export URL, vectors [N, D])``."""
    data = write_prepared(root / "data", num_users=60, num_items=num_items, max_len=MAX_LEN)
    vectors = np.random.default_rng(seed).standard_normal((num_items, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    model = ModelConfig(dim=DIM, dropout=0.0)
    torch.manual_seed(seed)
    encoder = MQSAEncoder(model, MAX_LEN)
    out = str(root / "export")
    export_vectors(out, str(data), vectors, encoder, model, protocol, faiss)
    return out, vectors


@pytest.fixture(scope="module")
def flat_export(tmp_path_factory) -> tuple[str, np.ndarray]:
    return synthetic_export(tmp_path_factory.mktemp("flat"))


def brute_force_top(rec: Recommender, history: list[int], k: int, exclude: bool) -> list[str]:
    """The top-``k`` raw ids by a full numpy scan of the query against every item."""
    (query,) = rec.encode([np.array(history)])
    scores = rec.vectors @ query
    if exclude:
        scores[history] = -np.inf
    top = np.argsort(-scores, kind="stable")[: min(k, len(scores) - exclude * len(set(history)))]
    return [f"i{j}" for j in top]


@pytest.mark.parametrize("faiss", ["flat", "none"])
def test_whole_history_is_excluded_beyond_max_len(tmp_path, faiss):
    out, _ = synthetic_export(tmp_path, faiss=faiss)
    rec = Recommender(out)
    history = list(range(3 * MAX_LEN))  # the encoder reads only the last MAX_LEN of them
    torch.testing.assert_close(
        torch.from_numpy(rec.encode([np.array(history)])),
        torch.from_numpy(rec.encode([np.array(history[-MAX_LEN:])])),
    )
    (result,) = rec.recommend([[f"i{j}" for j in history]], k=20)
    assert not {f"i{j}" for j in history} & set(result.items)
    assert result.items == brute_force_top(rec, history, 20, exclude=True)
    assert np.all(np.diff(result.scores) <= 1e-6)


def test_approximate_index_never_serves_history(tmp_path):
    out, _ = synthetic_export(tmp_path, num_items=400, faiss="ivf")
    rec = Recommender(out)
    assert not rec.exact
    history = [f"i{j}" for j in range(0, 400, 7)]
    (result,) = rec.recommend([history], k=30)
    assert len(result.items) == 30 == len(set(result.items))
    assert not set(history) & set(result.items)


def test_k_beyond_what_is_left_returns_what_exists(flat_export):
    rec = Recommender(flat_export[0])
    history = [f"i{j}" for j in range(5)]
    (result,) = rec.recommend([history], k=1000)
    assert len(result.items) == 295 == len(set(result.items))
    assert np.isfinite(result.scores).all() and not set(history) & set(result.items)


@pytest.mark.parametrize("k", ["0", "-5"])
def test_k_below_one_exits_2(flat_export, capsys, k):
    assert main([flat_export[0], "--history", "i1", "--k", k]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --k must be at least 1, got {k}"]
    with pytest.raises(QueryError, match="k must be at least 1"):
        Recommender(flat_export[0]).recommend([["i1"]], k=int(k))


def test_unknown_ids_are_named_and_an_empty_history_exits_2(flat_export, capsys):
    out = flat_export[0]
    assert main([out, "--history", "i1,nope-1,i2", "--k", "3"]) == 0
    captured = capsys.readouterr()
    assert "nope-1" in captured.err and len(captured.out.splitlines()) == 3
    for history in ("nope-1,nope-2", ",", " "):
        assert main([out, "--history", history]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err[-1:]) == 1 and err[-1].startswith("error: 1 of 1 histories hold no known")
        assert "--popular-fallback" in err[-1]


def test_popular_fallback_returns_the_most_frequent_items(flat_export, tmp_path, capsys):
    out = flat_export[0]
    vocab = pq.read_table(Path(out).parent / "data" / "vocab").to_pandas()
    popular = vocab.sort_values(["count", "index"], ascending=[False, True])["item_id"][:5]
    assert main([out, "--history", "nope", "--k", "5", "--popular-fallback"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == list(popular)
    batch = tmp_path / "histories.parquet"
    pq.write_table(pa.table({"user_id": ["a", "b"], "history": [["i3", "i4"], ["nope"]]}), batch)
    assert main([out, "--batch", str(batch), "--k", "5"]) == 2
    recs = tmp_path / "recs.parquet"
    assert (
        main([out, "--batch", str(batch), "--k", "5", "--out", str(recs), "--popular-fallback"])
        == 0
    )
    rows = pq.read_table(recs).to_pylist()
    assert rows[1]["items"] == list(popular) and len(rows[0]["items"]) == 5
    assert not {"i3", "i4"} & set(rows[0]["items"])


def test_protocol_decides_the_exclusion(tmp_path):
    out, _ = synthetic_export(tmp_path, protocol="repeat_aware")
    history = list(range(0, 300, 2))
    raw = [f"i{j}" for j in history]
    rec = Recommender(out)
    assert not rec.exclude_history
    (result,) = rec.recommend([raw], k=10)
    assert result.items == brute_force_top(rec, history, 10, exclude=False)
    assert set(raw) & set(result.items)  # random vectors: half the items are history items
    (excluded,) = Recommender(out, exclude_history=True).recommend([raw], k=10)
    assert excluded.items == brute_force_top(rec, history, 10, exclude=True)
