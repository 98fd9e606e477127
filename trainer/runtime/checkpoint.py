"""Checkpoints: the DeepSpeed engine's own checkpoint, per-rank RNG and loss sums, trainer state.

Layout under the checkpoint root (``checkpoint.dir``, default ``<run_dir>/checkpoints``)::

    .mqsa-ted-owned             ownership marker of the root when this project created it
    step-000000123/
        .mqsa-ted-owned         written first (mqsa_core.storage.mark_owned): only directories with
                                this marker are ever replaced or deleted (rotation, retries)
        ds/...                  engine.save_checkpoint (weights + optimizer, per ZeRO stage)
        table/...               torch.distributed.checkpoint of a sharded item table and its
                                fused optimizer state (TorchRec backend only)
        rank-00000.pt           that rank's RNG state and partial-epoch loss sums (weights_only)
        trainer_state.json      epoch, step, best metrics, history, config hash, vocab size
        COMPLETE                written last, after every rank has finished: the commit marker,
                                with the size of every file of the checkpoint (its manifest)

A directory without ``COMPLETE`` (a run killed while saving) is never loaded. Remote roots
(``s3://``...) are staged in a local directory and uploaded before the marker is written.

Trust boundary: a checkpoint root is an artifact of the run that wrote it. Every torch file in
it is loaded with ``torch.load(weights_only=True)`` and an allowlist of exactly the DeepSpeed
classes its ZeRO 0-2 files hold (:func:`deepspeed_classes`); DeepSpeed's engine is given a
checkpoint engine that loads that way too (:class:`WeightsOnlyCheckpointEngine`). Before any
load, each rank unpickles that way, without reading tensors, the torch files of the chosen
checkpoint that it wrote (:func:`screen`, :meth:`Checkpointer.own_problem`); a file the loader
refuses, or one that is no ``torch.save`` archive, stops the resume with
:class:`CheckpointError`: this trainer did not write it. The metadata of a sharded
table's DCP checkpoint is a pickle that torch reads as is: resume only from roots you trust as
much as your own runs (docs/security.md).

Resume: ``train.resume=auto`` takes the newest complete checkpoint of ours that passes
:meth:`Checkpointer.problem` (every file of the manifest present with its size, every torch
file and the trainer state readable, each rank checking the files it wrote: one collective
combines the verdicts); a damaged one is skipped with a warning naming it and the one used
instead. A checkpoint named explicitly must pass, or the resume stops. Each rank then reads only
what it loads (:class:`ResumeReader`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import pickle
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException

from mqsa_core.collectives import all_gather_objects, barrier
from mqsa_core.config import HASHED_SECTIONS, Config, config_hash
from mqsa_core.errors import CheckpointError, UserError
from mqsa_core.log import get_logger
from mqsa_core.storage import (
    OWNER_MARKER,
    full_url,
    is_local,
    is_owned,
    load_state,
    mark_owned,
    read_json,
    remove_owned,
    save_state,
    url_to_fs,
    write_failure,
    write_json,
)
from trainer.runtime.distributed import DistEnv
from trainer.runtime.optimizer_state import OPTIMIZER_FILE, named_optimizer_state, partitioned

__all__ = [
    "CheckpointError", "Checkpointer", "TrainerState", "load_best_rows", "load_best_table",
    "save_best",
]  # fmt: skip

log = get_logger(__name__)
COMPLETE = "COMPLETE"
DS_TAG = "ds"
TABLE_DIR = "table"
STATE_FILE = "trainer_state.json"
CHECKPOINT_KIND = "checkpoint"
BEST_TABLE = "best_table-e"
# what reading a damaged file raises (torch's zip reader, json, a missing file)
READ_ERRORS = (OSError, RuntimeError, ValueError, EOFError, KeyError)
ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes zip archives


def first_line(error: BaseException) -> str:
    """The first sentence of an error's message (torch appends paragraphs of advice)."""
    text = str(error).strip()
    return text.splitlines()[0].split(". ")[0] if text else type(error).__name__


def deepspeed_classes() -> list[type]:
    """The classes besides tensors and plain containers in DeepSpeed's checkpoints of this
    model: none in the model states of ZeRO 0-2, these three in the ZeRO 1/2 optimizer states
    (found with ``torch.serialization.get_unsafe_globals_in_checkpoint`` on real checkpoints)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_torch_file(
    source: str | io.BufferedIOBase, name: str, map_location: Any = None, mmap: bool = False
) -> Any:
    """``torch.load(weights_only=True)`` of a checkpoint file, allowing only
    :func:`deepspeed_classes` besides tensors and plain containers: nothing in it can run code.
    A file the weights-only loader refuses raises :class:`CheckpointError` naming it."""
    try:
        with torch.serialization.safe_globals(deepspeed_classes()):
            return torch.load(source, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        lines = [line for line in str(e).splitlines() if "Unsupported" in line]
        detail = lines[0].split("error: ")[-1].split(" was not")[0] if lines else first_line(e)
        raise CheckpointError(
            f"{name} was refused by the weights-only loader: it holds objects other than "
            f"tensors, plain containers and DeepSpeed's checkpoint classes ({detail}); this "
            "trainer did not write it. Delete that checkpoint or resume from another one"
        ) from e


def screen(url: str) -> None:
    """Unpickle the checkpoint file ``url`` as a resume would (weights-only, the allowlist),
    memory-mapped where it is local so that no tensor is read. Raises :class:`CheckpointError`
    if the loader refuses it or it is no ``torch.save`` archive (a zip), and one of
    ``READ_ERRORS`` if it is damaged (truncated...)."""
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as f:
        head = f.read(len(ZIP_MAGIC))
        if head != ZIP_MAGIC[: len(head)]:
            raise CheckpointError(
                f"{url} is not a torch.save archive: this trainer did not write it. Delete that "
                "checkpoint or resume from another one"
            )
        if is_local(url):
            load_torch_file(path, url, "cpu", mmap=True)
        else:
            f.seek(0)
            load_torch_file(io.BytesIO(f.read()), url, "cpu")


class WeightsOnlyCheckpointEngine:
    """DeepSpeed's checkpoint engine (``inner``) with ``load`` through :func:`load_torch_file`
    and ``save`` through :func:`mqsa_core.storage.save_state` (atomic; a failed write names the file
    and the OS error, e.g. ``No space left on device``); every other method is ``inner``'s."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def save(self, state_dict: dict, path: str) -> None:
        save_state(path, state_dict)

    def load(self, path: str, map_location: Any = None) -> Any:
        return load_torch_file(path, path, map_location)


def weights_only(engine: Any) -> Any:
    """``engine`` with its checkpoint engine wrapped in :class:`WeightsOnlyCheckpointEngine`."""
    if not isinstance(engine.checkpoint_engine, WeightsOnlyCheckpointEngine):
        engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine.checkpoint_engine)
    return engine


@contextlib.contextmanager
def writing(url: str) -> Iterator[None]:
    """Turn a failed write under ``url`` by DeepSpeed, DCP or an upload into a
    :class:`StorageError` naming ``url``, the OS error and the free space."""
    try:
        yield
    except UserError:
        raise
    except (OSError, RuntimeError, CheckpointException) as e:
        raise write_failure(url, e) from e


def load_sharded(table, reader: FileSystemReader) -> None:
    """Load a DCP checkpoint of a sharded table and its fused optimizer state through ``reader``
    (any world size for row-wise sharding: DCP reshards)."""
    state = table.snapshot_state()
    dcp.load(state, storage_reader=reader)
    table.load_state_dict(state["table"])
    table.fused_optimizer.load_state_dict(state["opt"])


def prune(urls: list[str], kind: str) -> None:
    """Delete the directories ``urls`` that this project created as ``kind``; leave (and name)
    any other one."""
    for url in urls:
        if is_owned(url, kind):
            remove_owned(url, kind)
        else:
            log.warning(
                f"not deleting {url}: it has no {OWNER_MARKER} marker (not created by this run)"
            )


@dataclass
class TrainerState:
    """Where training stands; ``epoch``/``step_in_epoch`` point at the next batch to run."""

    epoch: int = 1
    step_in_epoch: int = 0
    global_step: int = 0
    stale: int = 0
    best: dict = field(default_factory=lambda: {"best_epoch": 0, "valid": {}, "test": {}})
    history: list = field(default_factory=list)


WRITER_PATTERNS = (
    re.compile(r"rank-(\d+)\.pt"),  # this trainer's per-rank RNG and loss sums
    re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_.*"),  # a DeepSpeed ZeRO optimizer partition
    re.compile(r"__(\d+)_\d+\.distcp"),  # a DCP shard file of the sharded table
)


def writer_rank(name: str) -> int:
    """The rank that wrote the checkpoint file ``name`` (a path relative to the checkpoint):
    the files above name it; the rest (DeepSpeed's model states, DCP's metadata, the trainer
    state) are rank 0's."""
    base = name.rsplit("/", 1)[-1]
    for pattern in WRITER_PATTERNS:
        if match := pattern.fullmatch(base):
            return int(match[1])
    return 0


def deepspeed_reads(name: str) -> bool:
    """Whether DeepSpeed's ``load_checkpoint`` reads the file ``name`` on every rank: the model
    states and, under ZeRO 1/2, every optimizer partition (it merges them for any world)."""
    return name.startswith(f"{DS_TAG}/") and name.endswith(("model_states.pt", "optim_states.pt"))


class ResumeReader:
    """This rank's reads of one checkpoint: files fetched into a local directory when the
    checkpoint is remote (used in place when local), and the bytes read counted."""

    def __init__(self, url: str, local_dir: str | None) -> None:
        self.url, self.local_dir = url, local_dir
        self.fs, self.path = url_to_fs(url)
        self.bytes = 0

    def local(self, name: str) -> str:
        """The local path of the checkpoint file ``name``, fetched first when remote."""
        source = f"{self.path}/{name}"
        if self.local_dir is None:
            self.bytes += os.path.getsize(source)
            return source
        target = os.path.join(self.local_dir, name)
        if not os.path.exists(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            self.fs.get(source, target)
            self.bytes += os.path.getsize(target)
        return target

    def root(self) -> str:
        return self.path if self.local_dir is None else self.local_dir


class ShardReader(FileSystemReader):
    """DCP's file reader over the ``table/`` of a checkpoint that fetches (or counts) only the
    shard files this rank's load plan reads, through a :class:`ResumeReader`."""

    def __init__(self, reader: ResumeReader) -> None:
        self.reader = reader
        reader.local(f"{TABLE_DIR}/.metadata")
        super().__init__(os.path.join(reader.root(), TABLE_DIR))

    def read_data(self, plan, planner):
        for name in sorted({self.storage_data[i.storage_index].relative_path for i in plan.items}):
            self.reader.local(f"{TABLE_DIR}/{name}")
        return super().read_data(plan, planner)


@contextlib.contextmanager
def staged(url: str) -> Iterator[str]:
    """A local directory to write the checkpoint ``url`` into: itself when local, else a
    temporary one uploaded to ``url`` at the end (and removed)."""
    fs, path = url_to_fs(url)
    if is_local(url):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="ckpt-") as local:
        yield local
        with writing(url):
            fs.put(f"{local}/", path, recursive=True)


class Checkpointer:
    """Saves, finds and loads checkpoints of one run (all ranks call every method)."""

    def __init__(self, cfg: Config, env: DistEnv, num_items: int) -> None:
        self.cfg, self.env = cfg, env
        self.root = (cfg.checkpoint.dir or f"{cfg.train.run_dir}/checkpoints").rstrip("/")
        self.identity = {
            "config_hash": config_hash(cfg),
            "num_items": num_items,
            "config": {section: cfg.to_dict()[section] for section in HASHED_SECTIONS},
        }
        self.fs, self.root_path = url_to_fs(self.root)

    def complete(self) -> list[str]:
        """Complete checkpoint URLs under the root, oldest first."""
        if not self.fs.exists(self.root_path):
            return []
        dirs = sorted(
            p
            for p in self.fs.ls(self.root_path, detail=False)
            if p.rstrip("/").split("/")[-1].startswith("step-")
        )
        return [full_url(self.fs, d) for d in dirs if self.fs.exists(f"{d}/{COMPLETE}")]

    def clear(self) -> int:
        """Delete this root's checkpoints that this project wrote, complete or not (a fresh
        start: ``train.resume=fresh``); returns how many (collective)."""
        removed = 0
        if self.env.is_main and self.fs.exists(self.root_path):
            steps = [
                full_url(self.fs, p)
                for p in sorted(self.fs.ls(self.root_path, detail=False))
                if p.rstrip("/").split("/")[-1].startswith("step-")
            ]
            prune(steps, CHECKPOINT_KIND)
            removed = sum(not self.fs.exists(url_to_fs(u)[1]) for u in steps)
        barrier()
        return removed

    def save(self, engine, table, state: TrainerState, loss_sums: torch.Tensor) -> str:
        """Write a checkpoint of ``engine``, a sharded ``table`` and ``state``; returns its URL
        once committed. A failed write raises :class:`StorageError` naming the checkpoint, the
        OS error and the free space."""
        engine = weights_only(engine)
        url = full_url(self.fs, f"{self.root_path}/step-{state.global_step:09d}")
        if self.env.is_main:
            mark_owned(self.root, "checkpoints")  # a root of someone else's files stays theirs
            if is_owned(url, CHECKPOINT_KIND):
                remove_owned(url, CHECKPOINT_KIND)  # an unfinished attempt at the same step
            if not mark_owned(url, CHECKPOINT_KIND, step=state.global_step):
                raise CheckpointError(
                    f"{url} exists and holds files this project did not write: refusing to "
                    "write a checkpoint over them (move them away or set checkpoint.dir)"
                )
        barrier()
        with staged(url) as staging:
            self._write(engine, table, state, loss_sums, staging, url)
        barrier()
        if self.env.is_main:
            done = {"world": self.env.world, "step": state.global_step}
            write_json(f"{url}/{COMPLETE}", {**done, "files": self.manifest(url)})
            prune(self.complete()[: -self.cfg.checkpoint.keep], CHECKPOINT_KIND)
        barrier()
        return url

    def _write(self, engine, table, state, loss_sums, staging: str, url: str) -> None:
        """This rank's files of the checkpoint ``url``, written into the local ``staging``."""
        with writing(url):
            engine.save_checkpoint(staging, tag=DS_TAG, save_latest=False)
            if table.has_fused_optimizer:
                dcp.save(table.snapshot_state(), checkpoint_id=f"{staging}/{TABLE_DIR}")
        rank_state = {
            "rng": torch.get_rng_state(),
            "loss_sums": loss_sums.detach().cpu(),
            "world": self.env.world,
        }
        if self.env.device.type == "cuda":
            rank_state["cuda_rng"] = torch.cuda.get_rng_state(self.env.device)
        save_state(f"{staging}/rank-{self.env.rank:05d}.pt", rank_state)
        if self.env.is_main:
            write_json(f"{staging}/{STATE_FILE}", {**dataclasses.asdict(state), **self.identity})

    def manifest(self, url: str) -> dict[str, int]:
        """``{relative path: size}`` of every file of the checkpoint ``url`` (its markers
        aside)."""
        fs, path = url_to_fs(url)
        files = fs.find(path, detail=True)
        prefix = path.rstrip("/") + "/"
        sizes = {name.removeprefix(prefix): info["size"] for name, info in files.items()}
        return {k: v for k, v in sorted(sizes.items()) if k not in (COMPLETE, OWNER_MARKER)}

    def own_problem(self, url: str) -> tuple[bool, str] | None:
        """What is wrong with this rank's share of the complete checkpoint ``url``, or None:
        ``(refused, why)``. A rank checks the commit marker and the files it wrote
        (:func:`writer_rank`, modulo this world), each present with its size when written and,
        for torch files, readable by the weights-only loader (:func:`screen`); ``refused``
        when that loader refuses one (not damage: this trainer did not write it)."""
        fs, path, world = *url_to_fs(url), self.env.world
        try:
            written = read_json(f"{url}/{COMPLETE}").get("files", {})
        except READ_ERRORS as e:
            return False, f"{COMPLETE}: {first_line(e)}"
        damage = None  # the first one; a file the safe loader refuses comes before any damage
        if self.env.is_main:
            written.setdefault(STATE_FILE, None)  # listed or not, rank 0 reads it
        for name, size in written.items():
            if writer_rank(name) % world != self.env.rank:
                continue
            try:
                now = fs.size(f"{path}/{name}")
            except FileNotFoundError:
                damage = damage or f"{name} is missing"
                continue
            found = None if size in (None, now) else f"{name} has {now} bytes, {size} when written"
            try:
                if name.endswith(".pt"):
                    screen(full_url(fs, f"{path}/{name}"))
                elif name == STATE_FILE:
                    read_json(f"{url}/{name}")
            except CheckpointError as e:
                return True, str(e)
            except READ_ERRORS as e:
                found = found or f"{name}: {first_line(e)}"
            damage = damage or found
        return (False, damage) if damage else None

    def problem(self, url: str) -> str | None:
        """Why the complete checkpoint ``url`` cannot be resumed from, or None: every rank's
        :meth:`own_problem` combined in one collective, so that all ranks take the same
        decision. Raises :class:`CheckpointError` on every rank when a file was refused."""
        verdicts = all_gather_objects(self.own_problem(url))
        found = [(rank, v) for rank, v in enumerate(verdicts) if v is not None]
        refused = [why for _, (was_refused, why) in found if was_refused]
        if refused:
            raise CheckpointError(refused[0])
        if not found:
            return None
        rank, (_, why) = found[0]
        return why if self.env.world == 1 else f"{why} (seen by rank {rank})"

    def candidates(self) -> list[str]:
        """The complete checkpoints this project wrote (our marker), oldest first, as rank 0
        lists them, on every rank (collective): one list to walk."""
        ours = (
            [u for u in self.complete() if is_owned(u, CHECKPOINT_KIND)]
            if self.env.is_main
            else None
        )
        return all_gather_objects(ours)[0]

    def resolve(self, resume: str) -> str | None:
        """The checkpoint URL to resume from: ``auto`` = the newest complete one that is not
        damaged (None if there is none; an error if all of them are), else ``resume`` itself,
        which must be complete and undamaged."""
        if resume != "auto":
            fs, path = url_to_fs(resume)
            if not fs.exists(f"{path}/{COMPLETE}"):
                raise CheckpointError(f"{resume} is not a complete checkpoint (no {COMPLETE})")
            problem = self.problem(resume)
            if problem:
                raise CheckpointError(f"checkpoint {resume} is damaged: {problem}")
            return resume
        skipped = []
        for url in reversed(self.candidates()):
            problem = self.problem(url)
            if problem is None:
                if skipped and self.env.is_main:
                    damaged = "; ".join(f"checkpoint {s} is damaged ({p})" for s, p in skipped)
                    log.warning(f"{damaged}; resuming from the previous complete one, {url}")
                return url
            skipped.append((url, problem))
        if skipped:
            raise CheckpointError(
                f"no loadable checkpoint under {self.root}: "
                + "; ".join(f"{s} is damaged: {p}" for s, p in skipped)
            )
        return None

    def check_identity(self, url: str, saved: dict) -> None:
        """Raise :class:`CheckpointError` unless the checkpoint ``url`` (its trainer state
        ``saved``) was written by a run of this config's data and model sections and vocab,
        naming every key that differs with both values."""
        if (
            saved.get("config_hash") == self.identity["config_hash"]
            and saved.get("num_items") == self.identity["num_items"]
        ):
            return
        differences = [
            f"{key} is {there!r} there and {here!r} here"
            for key, there, here in config_differences(saved.get("config"), self.identity)
        ]
        raise CheckpointError(
            f"checkpoint {url} does not match this run: "
            + "; ".join(differences)
            + f". Resume with the same settings, or start over with train.resume=fresh (deletes "
            f"the checkpoints under {self.root}) or another train.run_dir"
        )

    def load(self, engine, table, url: str) -> tuple[TrainerState, torch.Tensor, int]:
        """Restore ``engine`` (and a sharded ``table``) from ``url``, reading only what this rank
        loads (:class:`ResumeReader`); returns the trainer state, this rank's loss sums and the
        bytes this rank read."""
        saved = read_json(f"{url}/{STATE_FILE}")
        self.check_identity(url, saved)
        with contextlib.ExitStack() as stack:
            local = (
                None
                if is_local(url)
                else stack.enter_context(tempfile.TemporaryDirectory(prefix="ckpt-"))
            )
            reader = ResumeReader(url, local)
            written = read_json(f"{url}/{COMPLETE}").get("files", {})
            for name in written:
                if deepspeed_reads(name):
                    reader.local(name)
            try:
                load_path, _ = weights_only(engine).load_checkpoint(reader.root(), tag=DS_TAG)
            except (RuntimeError, ValueError, KeyError, OSError) as e:
                raise CheckpointError(f"DeepSpeed cannot load checkpoint {url}: {e}") from e
            if load_path is None:
                raise CheckpointError(f"DeepSpeed found no checkpoint in {url}/{DS_TAG}")
            if table.has_fused_optimizer:
                load_sharded(table, ShardReader(reader))
            loss_sums = torch.zeros(2, dtype=torch.float64)
            rank_file = f"rank-{self.env.rank:05d}.pt"
            if rank_file in written:
                rank_state = load_state(reader.local(rank_file))
                if rank_state["world"] == self.env.world:  # same layout: resume exact streams
                    torch.set_rng_state(rank_state["rng"])
                    if "cuda_rng" in rank_state and self.env.device.type == "cuda":
                        torch.cuda.set_rng_state(rank_state["cuda_rng"], self.env.device)
                    loss_sums = rank_state["loss_sums"]
        state = TrainerState(
            **{k: saved[k] for k in (f.name for f in dataclasses.fields(TrainerState))}
        )
        return state, loss_sums, reader.bytes


def config_differences(saved: dict | None, identity: dict) -> list[tuple[str, object, object]]:
    """``(key, value there, value here)`` for each setting of the hashed sections that differs
    between a checkpoint's config (``saved``; None for checkpoints that did not record it) and
    this run's ``identity``, and the vocabulary size."""
    here = identity["config"]
    if saved is None:
        found = [("config_hash", "another", identity["config_hash"])]
    else:
        found = [
            (f"{section}.{key}", saved.get(section, {}).get(key), value)
            for section, values in here.items()
            for key, value in values.items()
            if saved.get(section, {}).get(key) != value
        ]
    return found or [("the vocabulary's size", "another", identity["num_items"])]


def save_best(run_dir: str, model, table, optimizer, epoch: int, env: DistEnv) -> None:
    """Keep the best-validation weights and the optimizer state that goes with them (what a warm
    start carries): ``model.pt`` (dense part, plus the table when it is dense), ``optimizer.pt``
    (the dense part's state by parameter name, any ZeRO stage:
    :mod:`trainer.runtime.optimizer_state`) and, for a sharded table, ``best_table-eNNNNN/`` (DCP,
    each rank its shard and its fused optimizer state, with a COMPLETE marker; the previous one is
    deleted once the new one is committed)."""
    state = None
    if env.is_main or partitioned(model):  # collective under ZeRO 1/2, else only rank 0 reads
        state = named_optimizer_state(model, optimizer, epoch)
    if env.is_main:
        save_state(f"{run_dir}/model.pt", {k: v.cpu() for k, v in model.state_dict().items()})
        if state is not None:
            save_state(f"{run_dir}/{OPTIMIZER_FILE}", state)
    if not table.has_fused_optimizer:
        return
    fs, root = url_to_fs(run_dir)
    target = full_url(fs, f"{root}/{BEST_TABLE}{epoch:05d}")
    if env.is_main and not mark_owned(target, "best_table", epoch=epoch):
        raise CheckpointError(f"{target} holds files this project did not write: refusing")
    barrier()
    with writing(target):
        dcp.save(table.snapshot_state(), checkpoint_id=target)
    barrier()
    if env.is_main:
        write_json(f"{target}/{COMPLETE}", {"epoch": epoch, "world": env.world,
                                            "optimizer_state": True})  # fmt: skip
        old = [full_url(fs, p) for p in sorted(fs.glob(f"{root}/{BEST_TABLE}*"))]
        prune([u for u in old if u != target], "best_table")
    barrier()


def best_table(run_dir: str) -> tuple[str, dict]:
    """``(URL, COMPLETE marker)`` of the newest complete ``best_table-e*`` of ``run_dir``."""
    fs, root = url_to_fs(run_dir)
    done = sorted(p for p in fs.glob(f"{root}/{BEST_TABLE}*") if fs.exists(f"{p}/{COMPLETE}"))
    if not done:
        raise CheckpointError(f"{run_dir} holds no complete {BEST_TABLE}* snapshot")
    latest = full_url(fs, done[-1])  # a URL: DCP reads a bare "bucket/path" as a local path
    return latest, read_json(f"{latest}/{COMPLETE}")


def load_best_table(run_dir: str, table) -> str:
    """Load the newest complete ``best_table-e*`` of ``run_dir`` into a sharded ``table``
    (any world size: DCP reshards); returns its path."""
    latest, _ = best_table(run_dir)
    state = {"table": table.state_dict()}
    dcp.load(state, checkpoint_id=latest)
    table.load_state_dict(state["table"])
    return latest


def load_best_rows(run_dir: str, table, rows: int, optimizer: bool) -> tuple[str, bool]:
    """Load the newest complete ``best_table-e*`` of ``run_dir``, a table of ``rows`` items, into
    rows ``0..rows-1`` of the larger sharded ``table`` (any world size), with its fused optimizer
    state when ``optimizer`` and the snapshot holds it; returns ``(its path, whether the
    optimizer state was loaded)``. Collective."""
    latest, marker = best_table(run_dir)
    with_state = optimizer and bool(marker.get("optimizer_state"))
    state = table.prefix_state(rows + 1, with_state)  # the snapshot has its padding row too
    dcp.load(state, checkpoint_id=latest)
    table.keep_prefix(state, rows)
    return latest, with_state
