"""Process-group set-up shared by the trainer and the tools: torchrun or a single process.

DeepSpeed owns ``init_distributed``; gloo on CPU, nccl on GPU. Under a plain ``python`` launch
the same code runs as a world of one (rank 0 of 1) so there is a single code path.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _disable_deepspeed_shm_op() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shm comm op (~40 s) on the first init; it only
    serves inference all-reduce, so training does not need it."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(timeout_s: int = 600) -> DistEnv:
    """Initialise (once) the default process group from torchrun's environment, or as world 1."""
    use_cuda = torch.cuda.is_available()
    if "RANK" not in os.environ and not dist.is_initialized():
        # A plain `python` launch: a world of one on an in-memory store (no port to race for).
        os.environ.update(
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT="0",  # read by DeepSpeed, never bound
        )
        dist.init_process_group(
            "nccl" if use_cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1,
            timeout=datetime.timedelta(seconds=timeout_s),
        )  # fmt: skip
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_cuda else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    _disable_deepspeed_shm_op()
    import deepspeed

    deepspeed.init_distributed(  # adopts an existing default group
        dist_backend="nccl" if use_cuda else "gloo",
        timeout=datetime.timedelta(seconds=timeout_s),
        verbose=False,
    )
    return DistEnv(
        rank=dist.get_rank(),
        world=dist.get_world_size(),
        local_rank=local_rank,
        local_world=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        device=torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"),
    )


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a small tensor over all ranks (float64 on CPU for exact counts)."""
    out = values.detach().to(torch.float64).clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out)
    return out


def shutdown() -> None:
    """Leave the process group together: a rank that exits while another still tears down its
    gloo connections can make that rank abort (SIGABRT) after the work is done."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
