"""Item table sharded by TorchRec: one EmbeddingCollection table, FUSED kernel, fused optimizer.

The table has ``N + 1`` rows (row N = padding). ``DistributedModelParallel`` shards it
(``row_wise``, ``table_wise`` or ``column_wise``) with ``init_data_parallel=False``: the dense
encoder stays with DeepSpeed. The optimizer runs INSIDE the backward pass (fbgemm's fused TBE
update): ``engine.backward(loss)`` back-propagates through the lookup's all-to-all into each
owner's shard and updates the touched rows there; there is no separate optimizer step. TorchRec
divides the embedding gradients by the world size, like DeepSpeed's gradient averaging.

Optimizers (``embeddings.optimizer``): ``sgd`` (EXACT_SGD), ``adagrad`` (EXACT_ADAGRAD),
``rowwise_adagrad`` (EXACT_ROWWISE_ADAGRAD), ``adam`` (CUDA only: fbgemm's CPU TBE has none).
Weight decay: fbgemm's row-wise Adagrad takes the coupled L2 mode (``WeightDecayMode.L2``:
``wd * w`` is added to the gradient, the gradient of the paper's ``l2 * sum(w^2) / 2``); Adam
only the decoupled (AdamW-like) mode; EXACT_SGD and EXACT_ADAGRAD have none (``fused_params``
rejects a non-zero ``weight_decay`` there; ``from_config`` passes ``model.l2`` only where it is
supported). The decay reaches only the rows a step touches, not the whole table.

Padding: ids equal to N are never sent to TorchRec; their output rows are zeros. Row N therefore
never receives a gradient and stays zero.

Devices: the collection is sharded onto the run's device (``cuda:<local rank>`` under NCCL, the
host under gloo); the planner is given the real topology (HBM per GPU, compute device). On CUDA
the FUSED kernel runs row-wise Adagrad or Adam; on the host fbgemm's CPU kernel has SGD, Adagrad
and row-wise Adagrad. Export and evaluation move shards to the host explicitly (``export_rows``).

Initial values come from ``init_rows``: normal(0, init_std) generated per block of global rows
with a per-block seed, so every sharding and every world size holds the same table.
"""

from __future__ import annotations

import math
import os
import warnings

import fbgemm_gpu  # noqa: F401  (registers the TBE operators)
import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode
from torch.autograd import Variable
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, init_from_local_shards
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import (
    HardwareConfig,
    KernelConfig,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.types import ShardingEnv

from embeddings.base import INIT_BLOCK, ItemTable, init_rows
from mqsa_core.collectives import all_gather_rows, host_group, to_device
from mqsa_core.config import SHARDINGS, TABLE_OPTIMIZERS, EmbeddingsConfig, ModelConfig

TABLE = "item_table"
FEATURE = "item"
FBGEMM_OPTIMIZERS = (
    EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    EmbOptimType.EXACT_ADAGRAD,
    EmbOptimType.EXACT_SGD,
    EmbOptimType.ADAM,
)
OPTIMIZERS = dict(zip(TABLE_OPTIMIZERS, FBGEMM_OPTIMIZERS, strict=True))
WEIGHT_DECAY_OPTIMIZERS = ("rowwise_adagrad", "adam")


def fused_params(optimizer: str, lr: float, weight_decay: float, on_cuda: bool) -> dict:
    """fbgemm TBE arguments of the fused optimizer (see the module docstring)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown embeddings.optimizer {optimizer!r} (known: {list(OPTIMIZERS)})")
    if optimizer == "adam" and not on_cuda:
        raise ValueError("embeddings.optimizer=adam needs CUDA: fbgemm's CPU kernel has no Adam")
    params = {"optimizer": OPTIMIZERS[optimizer], "learning_rate": lr, "eps": 1e-8}
    if weight_decay:
        if optimizer == "rowwise_adagrad":
            params.update(weight_decay=weight_decay, weight_decay_mode=WeightDecayMode.L2)
        elif optimizer == "adam":
            params.update(weight_decay=weight_decay, weight_decay_mode=WeightDecayMode.DECOUPLE)
        else:
            raise ValueError(f"fbgemm's {optimizer} has no weight decay")
    return params


def local_world_size() -> int:
    """Processes on this node (torchrun's ``LOCAL_WORLD_SIZE``; 1 without torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def hardware(device: torch.device) -> HardwareConfig | None:
    """The planner's view of a GPU: its real HBM (None on the host: the planner's defaults)."""
    if device.type != "cuda":
        return None
    return HardwareConfig(hbm_cap_bytes=torch.cuda.get_device_properties(device).total_memory)


class TorchRecItemTable(ItemTable):
    """Sharded item table; see the module docstring.

    Collective calls (every rank must make them in the same order): ``lookup``, ``rows``,
    ``all_items``, ``item_sum``, ``local_rows`` and ``export_rows`` (column-wise shards),
    construction.
    """

    has_fused_optimizer = True

    def __init__(
        self,
        num_items: int,
        dim: int,
        sharding: str = "row_wise",
        optimizer: str = "rowwise_adagrad",
        lr: float = 0.05,
        weight_decay: float = 0.0,
        init_std: float = 0.01,
        seed: int = 0,
        device: torch.device | None = None,
        pg: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        if sharding not in SHARDINGS:
            raise ValueError(f"unknown embeddings.sharding {sharding!r} (known: {SHARDINGS})")
        self.num_items, self.dim, self.lr = num_items, dim, lr
        self.pg = pg or dist.group.WORLD
        self._device = torch.device(device or "cpu")
        collection = EmbeddingCollection(
            tables=[EmbeddingConfig(name=TABLE, embedding_dim=dim, num_embeddings=num_items + 1,
                                    feature_names=[FEATURE])],
            device=torch.device("meta"),
        )  # fmt: skip
        on_cuda = self._device.type == "cuda"
        sharder = EmbeddingCollectionSharder(
            fused_params=fused_params(optimizer, lr, weight_decay, on_cuda)
        )
        world = dist.get_world_size(self.pg)
        planner = EmbeddingShardingPlanner(
            topology=TopologyFactory.create_topology(
                TrainerConfig(world_size=world, local_world_size=min(world, local_world_size())),
                hardware_config=hardware(self._device),
                kernel_config=KernelConfig(compute_device=self._device.type),
            ),
            constraints={TABLE: ParameterConstraints(
                sharding_types=[sharding], compute_kernels=[EmbeddingComputeKernel.FUSED.value],
                min_partition=dim // world if dim % world == 0 else None)},  # column_wise: 1/rank
            storage_reservation=FixedPercentageStorageReservation(0.15),
        )  # fmt: skip
        self.dmp = DistributedModelParallel(
            collection,
            env=ShardingEnv.from_process_group(self.pg),
            device=self._device,
            plan=planner.collective_plan(collection, [sharder], self.pg),
            sharders=[sharder],
            init_data_parallel=False,
        )
        self._shards = self._local_shards()
        with torch.no_grad():
            for weight, row0, col0 in self._shards:  # block by block: no shard-sized temporary
                stop = row0 + weight.shape[0]
                edges = [row0, *range(row0 - row0 % INIT_BLOCK + INIT_BLOCK, stop, INIT_BLOCK)]
                for a, b in zip(edges, [*edges[1:], stop], strict=True):
                    rows = init_rows(a, b, dim, init_std, seed, num_items)  # host: same values
                    weight[a - row0 : b - row0].copy_(rows[:, col0 : col0 + weight.shape[1]])
        self._partial: torch.Tensor | None = None  # float64 [D]: this rank's share of item_sum
        self._tracking = False
        # rows the coming backward may update: (host ids, per-shard device indices, their sum)
        self._pending: tuple[torch.Tensor, list[torch.Tensor], torch.Tensor] | None = None

    @classmethod
    def from_config(
        cls,
        emb: EmbeddingsConfig,
        model: ModelConfig,
        num_items: int,
        seed: int,
        device: torch.device,
    ) -> TorchRecItemTable:
        """From ``embeddings.*``, ``model.dim`` wide; weight decay = ``model.l2`` where fbgemm
        supports it (row-wise Adagrad, Adam), none with ``sgd`` and ``adagrad``."""
        decay = model.l2 if emb.optimizer in WEIGHT_DECAY_OPTIMIZERS else 0.0
        return cls(num_items, model.dim, emb.sharding, emb.optimizer, emb.lr, decay,
                   seed=seed, device=device)  # fmt: skip

    @property
    def device(self) -> torch.device:
        return self._device

    # ---------------------------------------------------------------- lookups

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of ``ids`` ``[*]`` (padding N gives zeros), de-duplicated on the host (tests and
        tools; the training step reads through :meth:`rows`)."""
        flat = ids.reshape(-1).cpu()
        real = flat != self.padding_id
        uniq, inverse = flat[real].unique(return_inverse=True)  # [U], sorted
        if uniq.numel() and (uniq[0] < 0 or uniq[-1] >= self.num_items):
            raise IndexError(f"item ids must be in 0..{self.num_items} (padding = N)")
        rows = self.rows(to_device(uniq, self.device), uniq)  # [U, D]
        index = torch.full_like(flat, uniq.numel())
        index[real] = inverse
        out = torch.cat([rows, rows.new_zeros(1, self.dim)])[to_device(index, self.device)]
        return out.view(*ids.shape, self.dim)

    def rows(self, ids: torch.Tensor, host_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of distinct real ids ``[U]`` through ONE KeyedJaggedTensor exchange: ``[U, D]``.

        ``host_ids`` (the same ids on the host) lets the item-sum bookkeeping find the touched
        rows without reading the device; without it the ids are copied to the host."""
        kjt = KeyedJaggedTensor(
            keys=[FEATURE],
            values=ids,
            lengths=torch.full((1,), ids.numel(), dtype=torch.int32, device=self.device),
        )
        out = self.dmp(kjt)[FEATURE].values()
        if out.requires_grad and self.grad_gate is not None:
            out.register_hook(self.grad_gate)
        if self._tracking and torch.is_grad_enabled():
            self._track(host_ids if host_ids is not None else ids.cpu())
            if out.requires_grad:
                out.register_hook(self._on_grad)
        return out

    def all_items(self) -> torch.Tensor:
        """The ``[N, D]`` catalogue on every rank, looked up through the KJT path so that the
        gradient reaches the fused optimizer. Cost per call and rank: an all-to-all of ``N x D``
        rows forward and ``N x D`` gradients backward, ``N x D`` memory (paper mode only)."""
        ids = torch.arange(self.num_items)
        return self.rows(to_device(ids, self.device), ids)

    # ---------------------------------------------------------------- sum of all rows

    def item_sum(self) -> torch.Tensor:
        """Exact ``sum_j E_j`` ``[D]`` (no gradient), one ``[D]`` all-reduce per call.

        Each rank keeps its shards' row sum in float64 and updates it after every backward pass
        from the rows that pass touched (every rank's looked-up ids are all-gathered ON THE HOST
        at lookup time, each owner sums its touched rows before and after the fused update): the
        cost follows the batch, not N, and the device is never asked for an id. The first two
        calls sum the local shards in full.
        """
        local = self._partial
        if local is None:
            local = self._full_local_sum()
            if self._tracking:
                self._partial = local  # this step's lookups were tracked: deltas keep it exact
            self._tracking = True
        total = local.clone()
        dist.all_reduce(total, group=self.pg)
        return total.float()

    def _full_local_sum(self) -> torch.Tensor:
        out = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        for weight, row0, col0 in self._shards:
            rows = weight[: max(0, min(weight.shape[0], self.num_items - row0))]  # no padding
            out[col0 : col0 + weight.shape[1]] += rows.sum(0, dtype=torch.float64)
        return out

    def _shard_indices(self, owned: torch.Tensor) -> list[torch.Tensor]:
        """Host ids ``owned`` -> per local shard, the device row indices inside that shard."""
        parts = []
        for weight, row0, _ in self._shards:
            inside = (owned >= row0) & (owned < row0 + weight.shape[0])
            parts.append(to_device(owned[inside] - row0, self.device))
        return parts

    def _owned_sum(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """float64 ``[D]`` sum of the local parts of the rows ``parts`` (from _shard_indices)."""
        out = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        for (weight, _, col0), local in zip(self._shards, parts, strict=True):
            out[col0 : col0 + weight.shape[1]] += weight[local].sum(0, dtype=torch.float64)
        return out

    def _track(self, host_ids: torch.Tensor) -> None:
        """Record the rows this rank owns that the coming backward may update, with their sum.

        The union of every rank's ids is formed on the host (an all-gather over the host group),
        so finding the owned rows never waits for the device."""
        touched = all_gather_rows(host_ids.cpu(), host_group())[0].unique()
        owned = torch.cat(
            [touched[(touched >= r0) & (touched < r0 + w.shape[0])] for w, r0, _ in self._shards]
            or [touched[:0]]
        ).unique()
        if self._pending is not None:  # a second lookup before the backward: merge
            old_ids, old_parts, old_sum = self._pending
            new_ids = owned[~torch.isin(owned, old_ids)]
            parts = self._shard_indices(new_ids)
            merged = [torch.cat([a, b]) for a, b in zip(old_parts, parts, strict=True)]
            self._pending = (
                torch.cat([old_ids, new_ids]),
                merged,
                old_sum + self._owned_sum(parts),
            )
            return
        parts = self._shard_indices(owned)
        self._pending = (owned, parts, self._owned_sum(parts))

    def _on_grad(self, grad: torch.Tensor) -> None:
        Variable._execution_engine.queue_callback(self._apply_pending)  # after the fused update

    def _apply_pending(self) -> None:
        if self._pending is None:
            return
        _, parts, before = self._pending
        self._pending = None
        if self._partial is not None:
            self._partial += self._owned_sum(parts) - before

    # ---------------------------------------------------------------- shards and state

    def _local_shards(self) -> list[tuple[torch.Tensor, int, int]]:
        """``(weight view [rows, cols], first global row, first column)`` of each local shard."""
        state = self.dmp.state_dict()
        key = next(k for k in state if k.endswith(f"{TABLE}.weight"))
        return [
            (s.tensor, int(s.metadata.shard_offsets[0]), int(s.metadata.shard_offsets[1]))
            for s in state[key].local_shards()
        ]

    def _held_rows(self, chunk: int = 1 << 20) -> tuple[torch.Tensor, torch.Tensor]:
        """``(global row ids [R] on the host, vectors [R, D] on the device)`` this rank holds,
        padding row excluded.

        Row- and table-wise shards hold whole rows: no communication. Column-wise shards hold
        column slices, so each rank instead fetches full rows for an even share of the ids
        through the lookup (collective, ``chunk`` rows per exchange).
        """
        if all(w.shape[1] == self.dim for w, _, _ in self._shards):
            ids, vectors = [], []
            for weight, row0, _ in self._shards:
                count = max(0, min(weight.shape[0], self.num_items - row0))
                ids.append(torch.arange(row0, row0 + count))
                vectors.append(weight[:count].detach())
            return torch.cat(ids or [torch.zeros(0, dtype=torch.int64)]), torch.cat(
                vectors or [torch.zeros(0, self.dim, device=self.device)]
            )
        world, rank = dist.get_world_size(self.pg), dist.get_rank(self.pg)
        share = math.ceil(self.num_items / world)
        start, stop = min(rank * share, self.num_items), min((rank + 1) * share, self.num_items)
        ids = torch.arange(start, stop)
        parts = [torch.zeros(0, self.dim, device=self.device)]
        with torch.no_grad():
            parts += [self.rows(to_device(part, self.device), part) for part in ids.split(chunk)]
        return ids, torch.cat(parts)

    def held_ids(self) -> torch.Tensor:
        """Host ids of the whole rows in this rank's shards (row- and table-wise sharding)."""
        if any(w.shape[1] != self.dim for w, _, _ in self._shards):
            raise ValueError("column-wise shards hold no whole rows: held_ids is row/table-wise")
        ranges = [
            torch.arange(r0, min(r0 + w.shape[0], self.num_items)) for w, r0, _ in self._shards
        ]
        return torch.cat(ranges or [torch.zeros(0, dtype=torch.int64)])

    @torch.no_grad()
    def assign_rows(self, ids: torch.Tensor, values: torch.Tensor) -> None:
        """Write rows this rank holds (``held_ids``) into its shards; the item sum is recounted."""
        for weight, row0, _ in self._shards:
            inside = (ids >= row0) & (ids < row0 + weight.shape[0])
            weight[to_device(ids[inside] - row0, self.device)] = values[inside].to(weight)
        self._partial, self._pending = None, None

    def export_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(global row ids [R], vectors [R, D])`` held by this rank, moved to the host."""
        ids, vectors = self._held_rows()
        return ids, vectors.to("cpu", torch.float32)

    def local_rows(self) -> tuple[int, torch.Tensor]:
        """This rank's rows as ``(first_id, rows [C, D])`` on the device (contiguous ids)."""
        ids, vectors = self._held_rows()
        if ids.numel() == 0:
            return 0, vectors
        if not torch.equal(ids, torch.arange(int(ids[0]), int(ids[0]) + ids.numel())):
            raise ValueError("local_rows needs contiguous row ids (row-wise or table-wise shards)")
        return int(ids[0]), vectors

    @property
    def fused_optimizer(self):
        """The KeyedOptimizer of the fused update (its ``state_dict`` is DCP-compatible)."""
        return self.dmp.fused_optimizer

    def scale_learning_rate(self, factor: float) -> None:
        for group in self.fused_optimizer.param_groups:
            group["lr"] = self.lr * factor
        self.fused_optimizer.step()  # the fused kernel's step only hands the rate to fbgemm

    def snapshot_state(self, optimizer: bool = True) -> dict:
        """What a DCP snapshot of this table holds: ``{"table": sharded weights, "opt": the fused
        optimizer's sharded state}`` (``opt`` only with ``optimizer``). The local shards are
        views: loading into them writes the table."""
        state = {"table": self.state_dict()}
        if optimizer:
            state["opt"] = self.fused_optimizer.state_dict()
        return state

    def prefix_state(self, rows: int, optimizer: bool) -> dict:
        """:meth:`snapshot_state` of a smaller table, the first ``rows`` global rows of this one
        (an older version of the catalogue plus its padding row), in fresh buffers: ``dcp.load``
        fills them from that table's snapshot at any world size (DCP reads the overlapping
        chunks), then :meth:`keep_prefix` copies them in."""
        rank = dist.get_rank()
        state = self.snapshot_state(optimizer)

        def prefix(tensor: ShardedTensor) -> ShardedTensor:
            shards = []
            for shard in tensor.local_shards():
                offsets = list(shard.metadata.shard_offsets)
                count = min(shard.tensor.shape[0], rows - offsets[0])
                if count > 0:
                    buffer = torch.empty_like(shard.tensor[:count])
                    shards.append(Shard.from_tensor_and_offsets(buffer, offsets, rank))
            with warnings.catch_warnings():  # TorchRec's state dicts are ShardedTensors too
                warnings.filterwarnings("ignore", "Please use DTensor", FutureWarning)
                return init_from_local_shards(
                    shards, rows, *tensor.size()[1:], process_group=self.pg
                )

        return _map_sharded(state, prefix)

    @torch.no_grad()
    def keep_prefix(self, loaded: dict, rows: int) -> None:
        """Write global rows ``0..rows-1`` of ``loaded`` (a filled :meth:`prefix_state`) into this
        table's weights and, where ``loaded`` has them, its fused optimizer's state; the other
        rows keep their values (new items: initial rows, fresh optimizer state)."""
        current = self.snapshot_state("opt" in loaded)

        def copy(target: ShardedTensor, source: ShardedTensor) -> None:
            held = {tuple(s.metadata.shard_offsets): s.tensor for s in target.local_shards()}
            for shard in source.local_shards():
                offsets = tuple(shard.metadata.shard_offsets)
                count = min(shard.tensor.shape[0], rows - offsets[0])
                held[offsets][:count].copy_(shard.tensor[:count])

        _zip_sharded(current, loaded, copy)
        self._partial, self._pending = None, None

    def state_dict(self, *args, **kwargs):
        """The sharded weights (ShardedTensor values), for ``torch.distributed.checkpoint``."""
        return self.dmp.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = self.dmp.load_state_dict(state_dict, strict=strict)
        self._shards = self._local_shards()
        self._partial, self._pending = None, None
        return result


def _map_sharded(state: dict, fn) -> dict:
    """``state`` (nested dicts) with every ShardedTensor replaced by ``fn(it)``."""
    return {k: _map_sharded(v, fn) if isinstance(v, dict) else fn(v) if isinstance(v, ShardedTensor)
            else v for k, v in state.items()}  # fmt: skip


def _zip_sharded(a: dict, b: dict, fn) -> None:
    """``fn(x, y)`` for the ShardedTensors at the same place in the nested dicts ``a`` and ``b``."""
    for key, value in b.items():
        if isinstance(value, dict):
            _zip_sharded(a[key], value, fn)
        elif isinstance(value, ShardedTensor):
            fn(a[key], value)
