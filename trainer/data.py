"""Reads the prepared data (``sequences/``, ``transitions/``, ``stats.json``) and builds batches.

Users' cut train sequences are right-aligned ``[U, M]`` int64 matrices (``M = max_len``; padding
id = N). Paper mode holds all users in one (small even for millions of users at M = 50); with
``data.stream`` each rank reads only its own row groups (``trainer.user_stream``).
"""

from __future__ import annotations

from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow.dataset as pads
import torch

from spark_jobs import io as spark_io
from spark_jobs.errors import PrepareError
from trainer.config import Config


class DataError(ValueError):
    """The prepared data is missing, empty or does not match the config."""


def _fs_and_path(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def parquet_files(url: str) -> list[str]:
    """Sorted Parquet files of a directory URL (fsspec); raises DataError when there are none."""
    fs, path = _fs_and_path(url)
    if not fs.exists(path):
        raise DataError(f"{url} does not exist: run `python -m spark_jobs.prepare CONFIG` first")
    files = sorted(p for p in fs.find(path) if p.endswith(".parquet"))
    if not files:
        raise DataError(f"{url} holds no Parquet files (an empty or unfinished prepare run?)")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return [f if protocol in ("file", "local") else f"{protocol}://{f}" for f in files]


def read_table(url: str, columns: list[str]):
    """Read the columns of every Parquet file under ``url`` into one pyarrow Table."""
    files = parquet_files(url)
    fs, _ = _fs_and_path(url)
    paths = [_fs_and_path(f)[1] for f in files]
    try:
        return pads.dataset(paths, format="parquet", filesystem=fs).to_table(columns=columns)
    except (KeyError, ValueError) as e:
        raise DataError(f"{url}: cannot read columns {columns}: {e}") from e


def read_stats(data_dir: str) -> dict:
    """``stats.json`` of a COMMITTED prepared data directory (its ``_COMPLETE`` marker is
    checked: a half-written prepare output is refused)."""
    try:
        return spark_io.read_stats(data_dir)
    except PrepareError as e:
        raise DataError(str(e)) from e


@dataclass
class Sequences:
    """Users' data: all of them (paper mode) or one chunk of a streamed part.

    Attributes:
        train: ``[U, M]`` int64 cut train sequences, right-aligned, padding id N.
        valid: ``[U]`` validation targets.
        test: ``[U]`` test targets.
        num_items: N.
    """

    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    num_items: int

    @property
    def num_users(self) -> int:
        return self.train.shape[0]

    @property
    def max_len(self) -> int:
        return self.train.shape[1]

    def select(self, rows: torch.Tensor | slice) -> Sequences:
        """The users ``rows`` (an index tensor or a slice), in that order."""
        return Sequences(self.train[rows], self.valid[rows], self.test[rows], self.num_items)

    @staticmethod
    def cat(chunks: list[Sequences]) -> Sequences:
        """The users of ``chunks`` one after the other (at least one chunk)."""
        return Sequences(
            torch.cat([c.train for c in chunks]),
            torch.cat([c.valid for c in chunks]),
            torch.cat([c.test for c in chunks]),
            chunks[0].num_items,
        )

    def test_inputs(self) -> torch.Tensor:
        """Test input: (cut train + validation item)[-M:] ``[U, M]``."""
        shifted = torch.empty_like(self.train)
        shifted[:, :-1] = self.train[:, 1:]
        shifted[:, -1] = self.valid
        return shifted


def right_align(lists, max_len: int, pad: int) -> np.ndarray:
    """Pack the last ``max_len`` items of each list into a right-aligned ``[U, M]`` matrix."""
    offsets = lists.offsets.to_numpy()
    values = lists.values.to_numpy(zero_copy_only=False).astype(np.int64)
    lengths = np.diff(offsets)
    keep = np.minimum(lengths, max_len)
    out = np.full((len(lengths), max_len), pad, dtype=np.int64)
    rows = np.repeat(np.arange(len(lengths)), keep)
    within = np.arange(keep.sum()) - np.repeat(np.cumsum(keep) - keep, keep)
    src = np.repeat(offsets[1:] - keep, keep) + within
    out[rows, max_len - np.repeat(keep, keep) + within] = values[src]
    return out


SEQUENCE_COLUMNS = ["train_items", "valid_item", "test_item"]


def prepared_stats(cfg: Config) -> dict:
    """The committed ``stats.json``, after checking that ``data.max_len`` matches it."""
    stats = read_stats(cfg.data.dir)
    if "max_len" in stats and int(stats["max_len"]) != cfg.data.max_len:
        raise DataError(
            f"data.max_len={cfg.data.max_len} but {cfg.data.dir} was prepared with "
            f"max_len={stats['max_len']}: re-run prepare or fix the config"
        )
    return stats


def sequences_from_table(table, max_len: int, num_items: int, where: str) -> Sequences:
    """Right-align and check one Arrow table of ``sequences/`` rows (``where`` names it in
    errors): every item index must lie in ``0..N-1``."""
    train_col = table.column("train_items").combine_chunks()
    values = train_col.values.to_numpy(zero_copy_only=False)
    valid = table.column("valid_item").to_numpy().astype(np.int64)
    test = table.column("test_item").to_numpy().astype(np.int64)
    if len(valid):
        top = max(values.max(initial=-1), valid.max(), test.max())
        if top >= num_items or min(values.min(initial=0), valid.min(), test.min()) < 0:
            raise DataError(f"{where} holds item index {top} but stats.json says {num_items} items")
    return Sequences(
        train=torch.from_numpy(right_align(train_col, max_len, num_items)),
        valid=torch.from_numpy(valid),
        test=torch.from_numpy(test),
        num_items=num_items,
    )


def load_sequences(cfg: Config) -> Sequences:
    """Read all of ``sequences/`` and check it against the config and ``stats.json``."""
    num_items = int(prepared_stats(cfg)["items"])
    url = cfg.data.dir.rstrip("/") + "/sequences"
    table = read_table(url, SEQUENCE_COLUMNS)
    if table.num_rows == 0:
        raise DataError(f"{cfg.data.dir}/sequences is empty: no user survived prepare")
    return sequences_from_table(table, cfg.data.max_len, num_items, url)


def load_transitions(data_dir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(src, dst, count)`` int64 arrays of ``transitions/``."""
    table = read_table(data_dir.rstrip("/") + "/transitions", ["src", "dst", "count"])
    return tuple(table.column(c).to_numpy().astype(np.int64) for c in ("src", "dst", "count"))


@dataclass
class Batch:
    """Left-padded training examples, trimmed to the longest sequence of the batch.

    Attributes:
        inputs: ``[B, T]`` input items (padding id N), slot ``T - 1`` = position ``max_len - 1``.
        targets: ``[B, T]`` next items.
        mask: ``[B, T]`` bool, True where ``inputs`` is a real item.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor


def trim(seqs: torch.Tensor, pad: int) -> torch.Tensor:
    """Drop the leading all-padding columns of a right-aligned ``[B, M]`` matrix (keeps >= 1)."""
    real = (seqs != pad).any(dim=0)
    first = int(real.nonzero()[0]) if bool(real.any()) else seqs.shape[1] - 1
    return seqs[:, first:]


def training_batch(train: torch.Tensor, pad: int) -> Batch:
    """Input = train[:-1], target = train[1:] (METHOD.md), from cut sequences ``[B, M]``."""
    inputs = torch.full_like(train, pad)
    inputs[:, 1:] = train[:, :-1]
    inputs = trim(inputs, pad)
    targets = train[:, train.shape[1] - inputs.shape[1] :]
    return Batch(inputs=inputs, targets=targets, mask=inputs != pad)


def epoch_order(num_users: int, seed: int, epoch: int) -> torch.Tensor:
    """The deterministic user permutation of an epoch ``[U]`` (same on every rank)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_users, generator=g)


def rank_slice(global_batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous share of a global batch of user ids (shares differ by <= 1)."""
    return global_batch.tensor_split(world)[rank]


def batch_share(batch_size: int, rank: int, world: int) -> int:
    """How many of a global batch's ``batch_size`` users ``rank`` takes (as ``rank_slice``)."""
    return batch_size // world + (1 if rank < batch_size % world else 0)
