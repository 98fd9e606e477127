"""Streaming users (data.stream): each rank reads only its row groups, every user is trained on
once per epoch and evaluated exactly once, all ranks run the same number of steps, and the
per-epoch shuffle is deterministic."""

from collections import Counter

import fsspec
import pytest
import torch

from mqsa_core.config import load_config
from mqsa_core.prepared import DataError
from tests.synthetic import write_prepared
from trainer.data.sequences import eval_sample, load_sequences
from trainer.data.user_source import InMemoryUsers
from trainer.data.user_stream import RowGroup, StreamingUsers, assign_row_groups, list_row_groups

NUM_USERS = 120


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    # 3 files of 40 users in row groups of 16, 16, 8: nine uneven parts
    root = tmp_path_factory.mktemp("stream") / "data"
    return write_prepared(root, num_users=NUM_USERS, num_files=3, row_group_size=16)


def config(data_dir, *overrides):
    return load_config(
        None, [f"data.dir={data_dir}", "data.max_len=12", "train.batch_size=32", *overrides]
    )


def streaming(cfg, rank: int, world: int) -> StreamingUsers:
    return StreamingUsers(cfg.data, cfg.train, rank, world)


def rows(train: torch.Tensor, *others: torch.Tensor) -> Counter:
    """A multiset of users, each as the tuple of its row(s)."""
    return Counter(
        tuple(train[i].tolist()) + tuple(int(o[i]) for o in others) for i in range(len(train))
    )


def test_row_groups_dealt_by_rows(data_dir):
    groups = list_row_groups(str(data_dir))
    assert sorted(g.num_rows for g in groups) == [8] * 3 + [16] * 6
    shares = assign_row_groups(groups, 2)
    assert sorted(sum(g.num_rows for g in s) for s in shares) == [56, 64]
    assert sorted(g for s in shares for g in s) == sorted(groups)  # disjoint, complete
    fake = [RowGroup(f"f{i}", 0, n) for i, n in enumerate([100, 60, 50, 10])]
    assert [sum(g.num_rows for g in s) for s in assign_row_groups(fake, 2)] == [110, 110]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_evaluation_sees_every_user_exactly_once(data_dir, world):
    cfg = config(data_dir)
    want = load_sequences(cfg.data)
    counts, seen = set(), Counter()
    for rank in range(world):
        count, batches = streaming(cfg, rank, world).eval_batches(batch_size=10)
        batches = list(batches)
        counts.add(count)
        assert len(batches) == count and all(b.num_users <= 10 for b in batches)
        for b in batches:
            seen += rows(b.train, b.valid, b.test)
    assert len(counts) == 1  # the same number of evaluation batches on every rank
    assert seen == rows(want.train, want.valid, want.test)


def evaluated(source) -> tuple[int, Counter]:
    """``(batch count, users)`` of one rank's evaluation batches."""
    count, batches = source.eval_batches(batch_size=4)
    seen = Counter()
    for b in batches:
        seen += rows(b.train, b.valid, b.test)
    return count, seen


def test_evaluation_sample_is_the_same_for_every_source_and_world(data_dir):
    """train.eval_users: one seeded sample of users, whatever the world size and whether the
    users are streamed or in memory; every rank runs the same number of batches."""
    cfg = config(data_dir, "train.eval_users=25")
    everyone = load_sequences(cfg.data)
    sample = eval_sample(NUM_USERS, 25, cfg.train.seed)
    assert sample.numel() == 25 and sample.unique().numel() == 25
    want = rows(everyone.train[sample], everyone.valid[sample], everyone.test[sample])
    sources = [
        lambda r, w: streaming(cfg, r, w),
        lambda r, w: InMemoryUsers(cfg.data, cfg.train, r, w),
    ]
    for make in sources:
        for world in (1, 2, 3):
            parts = [make(rank, world) for rank in range(world)]
            assert {p.num_eval_users for p in parts} == {25}
            results = [evaluated(p) for p in parts]
            assert len({count for count, _ in results}) == 1
            assert sum((seen for _, seen in results), Counter()) == want
    other = config(data_dir, "train.eval_users=25", "train.seed=5")
    assert not torch.equal(eval_sample(NUM_USERS, 25, other.train.seed), sample)
    assert eval_sample(NUM_USERS, 0, 1) is None and eval_sample(NUM_USERS, NUM_USERS, 1) is None


class CountingReads(StreamingUsers):
    """Records every row group this rank reads."""

    def _read(self, group):
        self.read_groups.append(group)
        return super()._read(group)


def test_epoch_covers_each_rank_share_and_steps_agree(data_dir):
    cfg = config(data_dir, "data.shuffle_buffer=20")
    want = load_sequences(cfg.data)
    first_pass, steps = Counter(), set()
    for rank in range(2):
        users = CountingReads(cfg.data, cfg.train, rank, 2)
        users.read_groups = []
        batches = [b.items for b in users.train_batches(epoch=1)]
        steps.add(len(batches))
        assert len(batches) == users.steps_per_epoch()
        assert all(b.shape == (users.batch, 12) for b in batches)
        assert set(users.read_groups) <= set(users.groups)  # only its own row groups
        stream = torch.cat(batches)
        first_pass += rows(stream[: users.rows])  # every user of its share, once
        repeats = rows(stream[users.rows :])
        assert sum(repeats.values()) == len(stream) - users.rows < users.batch + 8
    assert len(steps) == 1  # the epoch ends together
    assert first_pass == rows(want.train)


def test_shuffle_is_seeded_per_epoch_and_resumable(data_dir):
    users = streaming(config(data_dir, "data.shuffle_buffer=20"), 1, 2)

    def items(epoch: int, start_step: int = 0) -> list[torch.Tensor]:
        return [b.items for b in users.train_batches(epoch, start_step)]

    epoch1 = items(1)
    assert all(torch.equal(a, b) for a, b in zip(epoch1, items(1), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(epoch1, items(2), strict=True))
    resumed = items(1, start_step=2)
    assert len(resumed) == len(epoch1) - 2
    assert all(torch.equal(a, b) for a, b in zip(epoch1[2:], resumed, strict=True))


def test_buffer_bounds_memory(data_dir):
    users = streaming(config(data_dir, "data.shuffle_buffer=20"), 0, 1)
    chunks = list(users._shuffled_pass(epoch=1, pass_index=0))
    assert len(chunks) > 1 and max(c.num_users for c in chunks) < 20 + 16


def test_stream_errors(tmp_path, data_dir):
    with pytest.raises(DataError, match="9 row groups for 10 ranks"):
        streaming(config(data_dir), 0, 10)
    with pytest.raises(DataError, match="batch_size=4 is smaller than the 5 ranks"):
        streaming(config(data_dir, "train.batch_size=4"), 0, 5)
    short = write_prepared(tmp_path / "short", num_users=NUM_USERS)
    (short / "sequences" / "part-1.parquet").unlink()
    with pytest.raises(DataError, match="holds 60 users but stats.json says 120"):
        streaming(config(short), 0, 1)


def test_streams_through_fsspec_urls(data_dir):
    mem = fsspec.filesystem("memory")
    for path in data_dir.rglob("*"):
        if path.is_file():
            mem.pipe(f"/stream_data/{path.relative_to(data_dir)}", path.read_bytes())
    local = streaming(config(data_dir), 1, 2)
    remote = streaming(config("memory://stream_data"), 1, 2)
    assert all(
        torch.equal(a.items, b.items)
        for a, b in zip(local.train_batches(3), remote.train_batches(3), strict=True)
    )
