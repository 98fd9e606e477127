"""The few collectives the project needs, written once; a world of one skips the communication.

Every function must be called by all ranks in the same order. Tensors stay on their device:
under NCCL they are CUDA tensors, under gloo host tensors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without a process group."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if distributed():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of a small tensor, as float64 on the tensor's device (exact counts)."""
    out = values.detach().to(torch.float64).clone()
    if distributed():
        dist.all_reduce(out)
    return out


def all_gather_objects(value: object) -> list[object]:
    """Every rank's small picklable ``value`` in rank order (host-side, through gloo)."""
    if not distributed():
        return [value]
    values: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value, group=host_group())
    return values


def all_gather_rows(
    local: torch.Tensor, group: dist.ProcessGroup | None = None
) -> tuple[torch.Tensor, list[int]]:
    """Every rank's ``[b_r, ...]`` rows concatenated in rank order (``b_r`` may differ), and the
    list of the ``b_r``.

    One all-gather of the row counts (a host value: the output size depends on it) and one of
    the rows padded to the longest.
    """
    if not distributed():
        return local, [local.shape[0]]
    size = dist.get_world_size(group)
    counts = [local.new_zeros(1, dtype=torch.int64) for _ in range(size)]
    dist.all_gather(counts, torch.tensor([local.shape[0]], device=local.device), group=group)
    sizes = [int(c) for c in counts]
    padded = local.new_zeros(max(sizes), *local.shape[1:])
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)]), sizes


_HOST_GROUP: dist.ProcessGroup | None = None


def host_group() -> dist.ProcessGroup | None:
    """A gloo group over all ranks for exchanges of host tensors (sizes, id lists) that must not
    wait on the device: the default group when it is gloo, else one created once (collective:
    every rank's first call must happen at the same point; ``init_distributed`` makes it)."""
    global _HOST_GROUP
    if not distributed() or dist.get_backend() == "gloo":
        return None
    if _HOST_GROUP is None:
        _HOST_GROUP = dist.new_group(backend="gloo")
    return _HOST_GROUP


_LOADER_GROUP: dist.ProcessGroup | None = None


def loader_group() -> dist.ProcessGroup | None:
    """A gloo group used only by the prefetching reader thread (e.g. to share the global
    batch's targets), so its exchanges never interleave with the main thread's collectives.
    Created once, collectively (``init_distributed`` makes it)."""
    global _LOADER_GROUP
    if not distributed():
        return None
    if _LOADER_GROUP is None:
        _LOADER_GROUP = dist.new_group(backend="gloo")
    return _LOADER_GROUP


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` (on the host) on ``device``; to a GPU through pinned memory, asynchronously."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def max_over_ranks(value: int) -> int:
    """The largest of every rank's small integer ``value`` (host-side, through gloo: never
    waits on the device)."""
    if not distributed():
        return value
    out = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=host_group())
    return int(out[0])
