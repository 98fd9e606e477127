"""Loading an export takes time linear in the catalogue (it was quadratic: a Python list built
inside a comprehension over the items, 63 s at 10k items)."""

from __future__ import annotations

import time

from mqsa_ted.recommend import Recommender
from tests.test_serving_queries import synthetic_export


def load_seconds(export: str) -> float:
    """The faster of two loads (the machine is shared)."""
    times = []
    for _ in range(2):
        start = time.perf_counter()
        Recommender(export)
        times.append(time.perf_counter() - start)
    return min(times)


def test_load_time_grows_linearly(tmp_path):
    small, _ = synthetic_export(tmp_path / "small", num_items=20_000, faiss="flat")
    large, _ = synthetic_export(tmp_path / "large", num_items=200_000, faiss="flat")
    t_small, t_large = load_seconds(small), load_seconds(large)
    assert t_small < 10.0, f"20k items load in {t_small:.2f} s"
    # 10x the items: linear is <= 10x (fixed costs make it less), quadratic would be 100x
    assert t_large < 30 * max(t_small, 0.05), f"20k: {t_small:.3f} s, 200k: {t_large:.3f} s"
