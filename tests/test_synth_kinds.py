"""The synthetic kinds: seeded, and each with the structure it promises, seen through simple
predictors on the raw log (test = each user's last event):

- a last-item counter (the most frequent successors of the second-to-last item) is near its
  ceiling on ``markov``, weak on ``taste`` and in between on ``mixture``;
- on ``series`` the item two steps back predicts as much as the last one (the user's other
  series), so the two together beat the counter by far;
- on ``taste`` the order carries nothing: the items the user's own history co-occurs with beat
  the counter;
- ``longtail`` has many rare items.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import pandas as pd
import pyarrow.dataset as ds
import pytest

from spark_jobs.synth import KINDS, SynthSpec, main, write_log

SIZE = {"events": 40_000, "users": 2_000, "items": 400, "seed": 3}
K = 10


def log(tmp_path, kind: str) -> list[list[str]]:
    """The items of each user in time order."""
    url = str(tmp_path / kind)
    write_log(url, SynthSpec(kind=kind, **SIZE))
    df = ds.dataset(url).to_table().to_pandas().sort_values(["user_id", "timestamp"])
    return df.groupby("user_id")["item_id"].apply(list).tolist()


def successors(histories: list[list[str]]) -> dict[str, Counter]:
    """Successor counts over the training part (all but each user's last event)."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for items in histories:
        train = items[:-1]
        for a, b in zip(train, train[1:], strict=False):
            counts[a][b] += 1
    return counts


def hit_rate(histories: list[list[str]], predict) -> float:
    """Share of users whose last item is in ``predict(history)`` (at most K items)."""
    hits = 0
    for items in histories:
        top = predict(items[:-1])
        assert len(top) <= K
        hits += items[-1] in top
    return hits / len(histories)


def counter(counts):
    return lambda history: [i for i, _ in counts[history[-1]].most_common(K)]


def last_two(counts):
    """Half the list from each of the last two items' successors."""

    def predict(history):
        first = [i for i, _ in counts[history[-1]].most_common(K // 2)]
        second = [i for i, _ in counts[history[-2]].most_common(K) if i not in first]
        return first + second[: K - len(first)]

    return predict


def co_occurrence(histories):
    """The items most often in the same history as the user's items (order ignored)."""
    together: dict[str, Counter] = defaultdict(Counter)
    for items in histories:
        train = set(items[:-1])
        for a in train:
            together[a].update(train - {a})

    def predict(history):
        scores = Counter()
        for item in set(history):
            scores.update(together[item])
        return [i for i, _ in scores.most_common(K)]

    return predict


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_is_seeded(tmp_path, kind):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        write_log(str(tmp_path / name), SynthSpec(3_000, 150, 60, seed, kind))
    a, b, c = (ds.dataset(str(tmp_path / n)).to_table().to_pandas() for n in "abc")
    assert a.equals(b) and not a.equals(c)
    assert len(a) == 3_000 and a.groupby("user_id").size().min() >= 3


def test_markov_taste_and_mixture(tmp_path):
    rates = {}
    for kind in ("markov", "taste", "mixture"):
        histories = [h for h in log(tmp_path, kind) if len(h) >= 3]
        rates[kind] = hit_rate(histories, counter(successors(histories)))
        if kind == "taste":
            knn = hit_rate(histories, co_occurrence(histories))
            assert knn > 1.5 * rates[kind], (knn, rates[kind])
    # markov: 85% of steps follow one of 3 planted successors; the counter finds them
    assert rates["markov"] > 0.75
    assert rates["taste"] < 0.35
    assert rates["taste"] < rates["mixture"] < rates["markov"]


def test_series_depends_on_more_than_the_last_item(tmp_path):
    histories = [h for h in log(tmp_path, "series") if len(h) >= 3]
    counts = successors(histories)
    alone = hit_rate(histories, counter(counts))
    together = hit_rate(histories, last_two(counts))
    assert 0.3 < alone < 0.6  # about half the steps continue the last item's series
    assert together > 1.3 * alone, (together, alone)


def test_longtail_has_many_rare_items(tmp_path):
    url = str(tmp_path / "longtail")
    write_log(url, SynthSpec(kind="longtail", events=40_000, users=2_000, seed=3))
    counts = ds.dataset(url).to_table().to_pandas()["item_id"].value_counts()
    assert SynthSpec(kind="longtail", events=40_000).resolved().items == 4_000
    assert (counts <= 2).sum() > 0.3 * len(counts)  # a third of the items seen at most twice
    assert counts.iloc[:40].sum() > 0.2 * counts.sum()  # the top 1% takes a fifth of the events


def test_csv_with_iso_timestamps(tmp_path):
    out = tmp_path / "csv"
    assert main(["--out", str(out), "--events", "300", "--users", "20", "--items", "40",
                 "--kind", "series", "--format", "csv", "--time", "iso"]) == 0  # fmt: skip
    text = (out / "part-00000.csv").read_text().splitlines()
    assert text[0] == "user_id,item_id,timestamp" and len(text) == 301
    df = pd.read_csv(out / "part-00000.csv")
    parsed = pd.to_datetime(df["timestamp"], format="%Y-%m-%dT%H:%M:%SZ", utc=True)
    assert parsed.min() >= pd.Timestamp("2020-09-13", tz="UTC")


def test_unknown_kind_is_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x"), "--events", "30", "--kind", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
