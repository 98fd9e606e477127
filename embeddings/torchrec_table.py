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

Initial values come from ``init_rows``: normal(0, init_std) generated per block of global rows
with a per-block seed, so every sharding and every world size holds the same table.
"""

from __future__ import annotations

import math
import os

import fbgemm_gpu  # noqa: F401  (registers the TBE operators)
import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode
from torch.autograd import Variable
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.types import ShardingEnv

from embeddings.base import INIT_BLOCK, ItemTable, init_rows
from trainer.config import Config

TABLE = "item_table"
FEATURE = "item"
OPTIMIZERS = {
    "sgd": EmbOptimType.EXACT_SGD,
    "adagrad": EmbOptimType.EXACT_ADAGRAD,
    "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    "adam": EmbOptimType.ADAM,
}
SHARDINGS = ("row_wise", "table_wise", "column_wise")
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


def _all_gather_ids(ids: torch.Tensor, pg: dist.ProcessGroup) -> torch.Tensor:
    """Concatenation of every rank's 1-D ``ids`` (lengths may differ)."""
    world = dist.get_world_size(pg)
    sizes = [ids.new_zeros(1) for _ in range(world)]
    dist.all_gather(sizes, ids.new_tensor([ids.numel()]), group=pg)
    longest = int(max(s.item() for s in sizes))
    padded = torch.cat([ids, ids.new_zeros(longest - ids.numel())])
    parts = [ids.new_empty(longest) for _ in range(world)]
    dist.all_gather(parts, padded, group=pg)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])


class TorchRecItemTable(ItemTable):
    """Sharded item table; see the module docstring.

    Collective calls (every rank must make them in the same order): ``lookup``, ``lookup_many``,
    ``all_items``, ``item_sum``, ``export_rows`` for ``column_wise``, construction.
    """

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
        pg: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        if sharding not in SHARDINGS:
            raise ValueError(f"unknown embeddings.sharding {sharding!r} (known: {SHARDINGS})")
        self.num_items, self.dim = num_items, dim
        self.pg = pg or dist.group.WORLD
        on_cuda = torch.cuda.is_available()
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}" if on_cuda else "cpu")
        collection = EmbeddingCollection(
            tables=[EmbeddingConfig(name=TABLE, embedding_dim=dim, num_embeddings=num_items + 1,
                                    feature_names=[FEATURE])],
            device=torch.device("meta"),
        )  # fmt: skip
        sharder = EmbeddingCollectionSharder(
            fused_params=fused_params(optimizer, lr, weight_decay, on_cuda)
        )
        world = dist.get_world_size(self.pg)
        planner = EmbeddingShardingPlanner(
            topology=TopologyFactory.create_topology(
                TrainerConfig(world_size=world, local_world_size=min(world, local_world_size())),
                kernel_config=KernelConfig(compute_device=self.device.type),
            ),
            constraints={TABLE: ParameterConstraints(
                sharding_types=[sharding], compute_kernels=[EmbeddingComputeKernel.FUSED.value],
                min_partition=dim // world if dim % world == 0 else None)},  # column_wise: 1/rank
            storage_reservation=FixedPercentageStorageReservation(0.15),
        )  # fmt: skip
        self.dmp = DistributedModelParallel(
            collection,
            env=ShardingEnv.from_process_group(self.pg),
            device=self.device,
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
                    rows = init_rows(a, b, dim, init_std, seed, num_items)
                    weight[a - row0 : b - row0].copy_(rows[:, col0 : col0 + weight.shape[1]])
        self._partial: torch.Tensor | None = None  # float64 [D]: this rank's share of item_sum
        self._tracking = False
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (owned ids, old sum)

    @classmethod
    def from_config(cls, cfg: Config, num_items: int, seed: int = 0) -> TorchRecItemTable:
        """From ``embeddings.*``; weight decay = ``model.l2`` where fbgemm supports it (row-wise
        Adagrad, Adam), none with ``sgd`` and ``adagrad``."""
        emb = cfg.embeddings
        decay = cfg.model.l2 if emb.optimizer in WEIGHT_DECAY_OPTIMIZERS else 0.0
        return cls(num_items, cfg.model.dim, emb.sharding, emb.optimizer, emb.lr, decay, seed=seed)

    # ---------------------------------------------------------------- lookups

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lookup_many({"ids": ids})["ids"]

    def lookup_many(self, ids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """All groups in ONE KeyedJaggedTensor exchange: ``{name: [*]}`` to ``{name: [*, D]}``.

        Ids are de-duplicated across the groups before the exchange; padding ids (N) give zero
        rows and are not sent.
        """
        flat = torch.cat([v.reshape(-1) for v in ids.values()]).to(self.device)  # [S]
        real = flat != self.padding_id
        uniq, inverse = flat[real].unique(return_inverse=True)  # [U], sorted
        if uniq.numel() and (uniq[0] < 0 or uniq[-1] >= self.num_items):
            raise IndexError(f"item ids must be in 0..{self.num_items} (padding = N)")
        rows = self._exchange(uniq)  # [U, D]
        index = torch.full_like(flat, uniq.numel())
        index[real] = inverse
        out = torch.cat([rows, rows.new_zeros(1, self.dim)])[index]  # [S, D]
        sizes = [v.numel() for v in ids.values()]
        return {
            name: part.view(*value.shape, self.dim)
            for (name, value), part in zip(ids.items(), out.split(sizes), strict=True)
        }

    def all_items(self) -> torch.Tensor:
        """The ``[N, D]`` catalogue on every rank, looked up through the KJT path so that the
        gradient reaches the fused optimizer. Cost per call and rank: an all-to-all of ``N x D``
        rows forward and ``N x D`` gradients backward, ``N x D`` memory (paper mode only)."""
        return self._exchange(torch.arange(self.num_items, device=self.device))

    def _exchange(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of distinct real ids ``[U]`` through the sharded collection: ``[U, D]``."""
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=[FEATURE], values=ids, lengths=torch.tensor([ids.numel()], dtype=torch.int32)
        )
        rows = self.dmp(kjt)[FEATURE].values()
        if self._tracking and torch.is_grad_enabled():
            self._track(ids)
            if rows.requires_grad:
                rows.register_hook(self._on_grad)
        return rows

    # ---------------------------------------------------------------- sum of all rows

    def item_sum(self) -> torch.Tensor:
        """Exact ``sum_j E_j`` ``[D]`` (no gradient), one ``[D]`` all-reduce per call.

        Each rank keeps its shards' row sum in float64 and updates it after every backward pass
        from the rows that pass touched (every rank's looked-up ids are all-gathered at lookup
        time, each owner sums its touched rows before and after the fused update): the cost
        follows the batch, not N. The first two calls sum the local shards in full.
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

    def _owned_sum(self, ids: torch.Tensor) -> torch.Tensor:
        """float64 ``[D]`` sum of the local parts of rows ``ids`` (ids this rank owns)."""
        out = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        for weight, row0, col0 in self._shards:
            local = ids[(ids >= row0) & (ids < row0 + weight.shape[0])] - row0
            out[col0 : col0 + weight.shape[1]] += weight[local].sum(0, dtype=torch.float64)
        return out

    def _track(self, ids: torch.Tensor) -> None:
        """Record the rows this rank owns that the coming backward may update, with their sum."""
        touched = _all_gather_ids(ids, self.pg).to(self.device).unique()
        owned = torch.cat(
            [touched[(touched >= r0) & (touched < r0 + w.shape[0])] for w, r0, _ in self._shards]
            or [touched[:0]]
        ).unique()
        if self._pending is None:
            self._pending = (owned, self._owned_sum(owned))
            return
        old_ids, old_sum = self._pending  # a second lookup before the backward: merge
        new_ids = owned[~torch.isin(owned, old_ids)]
        self._pending = (torch.cat([old_ids, new_ids]), old_sum + self._owned_sum(new_ids))

    def _on_grad(self, grad: torch.Tensor) -> None:
        Variable._execution_engine.queue_callback(self._apply_pending)  # after the fused update

    def _apply_pending(self) -> None:
        if self._pending is None:
            return
        owned, before = self._pending
        self._pending = None
        if self._partial is not None:
            self._partial += self._owned_sum(owned) - before

    # ---------------------------------------------------------------- shards and state

    def _local_shards(self) -> list[tuple[torch.Tensor, int, int]]:
        """``(weight view [rows, cols], first global row, first column)`` of each local shard."""
        state = self.dmp.state_dict()
        key = next(k for k in state if k.endswith(f"{TABLE}.weight"))
        return [
            (s.tensor, int(s.metadata.shard_offsets[0]), int(s.metadata.shard_offsets[1]))
            for s in state[key].local_shards()
        ]

    def export_rows(self, chunk: int = 1 << 20) -> tuple[torch.Tensor, torch.Tensor]:
        """``(global row ids [R], vectors [R, D])`` held by this rank, padding row excluded.

        Row- and table-wise shards hold whole rows: no communication. Column-wise shards hold
        column slices, so each rank instead fetches full rows for an even share of the ids
        through the lookup (collective, ``chunk`` rows per exchange).
        """
        if all(w.shape[1] == self.dim for w, _, _ in self._shards):
            ids, vectors = [], []
            for weight, row0, _ in self._shards:
                count = max(0, min(weight.shape[0], self.num_items - row0))
                ids.append(torch.arange(row0, row0 + count))
                vectors.append(weight[:count].detach().clone())
            return torch.cat(ids or [torch.zeros(0, dtype=torch.int64)]), torch.cat(
                vectors or [torch.zeros(0, self.dim)]
            )
        world, rank = dist.get_world_size(self.pg), dist.get_rank(self.pg)
        share = math.ceil(self.num_items / world)
        start, stop = min(rank * share, self.num_items), min((rank + 1) * share, self.num_items)
        ids = torch.arange(start, stop, device=self.device)
        with torch.no_grad():
            parts = [self._exchange(ids[i * chunk : (i + 1) * chunk])
                     for i in range(math.ceil(share / chunk))]  # fmt: skip
        return ids, torch.cat(parts)

    def local_rows(self) -> tuple[int, torch.Tensor]:
        """This rank's shard as ``(first_id, rows [C, D])`` (row-wise or table-wise sharding)."""
        ids, vectors = self.export_rows()
        if ids.numel() == 0:
            return 0, vectors
        if not torch.equal(ids, torch.arange(int(ids[0]), int(ids[0]) + ids.numel())):
            raise ValueError("local_rows needs contiguous row ids (row-wise or table-wise shards)")
        return int(ids[0]), vectors

    @property
    def fused_optimizer(self):
        """The KeyedOptimizer of the fused update (its ``state_dict`` is DCP-compatible)."""
        return self.dmp.fused_optimizer

    def state_dict(self, *args, **kwargs):
        """The sharded weights (ShardedTensor values), for ``torch.distributed.checkpoint``."""
        return self.dmp.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = self.dmp.load_state_dict(state_dict, strict=strict)
        self._shards = self._local_shards()
        self._partial, self._pending = None, None
        return result
