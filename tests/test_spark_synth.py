"""The synthetic generator: deterministic per seed, >= 3 events per user, planted structure."""

from __future__ import annotations

from collections import Counter

import pyarrow.dataset as ds
import pyarrow.parquet as pq

from spark_jobs.synth import SynthSpec, main, write_log


def load(url: str):
    return ds.dataset(url).to_table().to_pandas()


def top_successor_share(df) -> float:
    """Share of consecutive pairs whose second item is the first item's most frequent next item
    (``df`` sorted by user, then event order)."""
    nxt = df.groupby("user_id")["item_id"].shift(-1)
    pairs = Counter(zip(df["item_id"][nxt.notna()], nxt.dropna(), strict=True))
    top = Counter()
    for (src, _), count in pairs.most_common():
        top.setdefault(src, count)
    return sum(top.values()) / sum(pairs.values())


def test_deterministic_for_a_seed(tmp_path):
    spec = SynthSpec(events=20_000, users=500, items=300, seed=7)
    write_log(str(tmp_path / "a"), spec)
    write_log(str(tmp_path / "b"), spec)
    write_log(str(tmp_path / "c"), SynthSpec(events=20_000, users=500, items=300, seed=8))
    a, b, c = load(str(tmp_path / "a")), load(str(tmp_path / "b")), load(str(tmp_path / "c"))
    assert a.equals(b)
    assert not a.equals(c)


def test_sizes_ids_and_structure(tmp_path):
    assert main(["--out", str(tmp_path / "log"), "--events", "30000", "--users", "1000",
                 "--items", "200", "--seed", "1"]) == 0  # fmt: skip
    df = load(str(tmp_path / "log"))
    assert len(df) == 30_000
    per_user = df.groupby("user_id").size()
    assert len(per_user) == 1000 and per_user.min() >= 3
    assert df["user_id"].str.match(r"^u\d{6}$").all() and df["item_id"].str.match(r"^i\d{6}$").all()
    df = df.sort_values(["user_id", "timestamp"])
    assert (df.groupby("user_id")["timestamp"].diff().dropna() > 0).all()
    # planted transitions: an item's most frequent successor follows it far above chance, and
    # more often than in the same histories shuffled (which keep each user's taste, so only the
    # sequential part of the structure is lost: 0.35 against 0.28 for this seed)
    assert top_successor_share(df) > 0.2
    shuffled = df.sample(frac=1.0, random_state=0).sort_values("user_id", kind="stable")
    assert top_successor_share(df) > 1.15 * top_successor_share(shuffled)
    counts = df["item_id"].value_counts()
    assert counts.iloc[0] > 5 * counts.median() > 15 * counts.iloc[-1]  # long-tailed popularity


def test_other_formats(tmp_path):
    write_log(str(tmp_path / "csv"), SynthSpec(events=300, users=20, items=10), "csv")
    write_log(str(tmp_path / "json"), SynthSpec(events=300, users=20, items=10), "json")
    names = sorted(p.name for p in (tmp_path / "csv").iterdir())
    assert names == [".mqsa-ted-owned", "_COMPLETE", "part-00000.csv"]
    assert (tmp_path / "json" / "part-00000.jsonl").read_text().count("\n") == 300


def test_a_file_names_only_the_items_it_holds(tmp_path):
    """Each Parquet file's item dictionary is the items of its rows, not the catalogue's."""
    spec = SynthSpec(events=3 << 20, users=60_000, items=400_000, seed=3)  # 3 files of ~1M
    write_log(str(tmp_path / "log"), spec)
    files = sorted((tmp_path / "log").glob("*.parquet"))
    assert len(files) >= 2
    for file in files:
        column = pq.read_table(file, columns=["item_id"])["item_id"].combine_chunks()
        assert len(column.dictionary) == len(set(column.to_pylist())) < spec.items
