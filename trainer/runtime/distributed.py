"""Process-group set-up shared by the trainer and the tools: torchrun, srun, mpirun or a single
process.

DeepSpeed owns ``init_distributed``; gloo on the host, NCCL on GPUs (``accelerator`` decides).
Ranks started by ``srun`` or ``mpirun`` have their launcher's variables mapped to torchrun's
first (``mqsa_core.launch_env``), so every launcher gives the same rank, world and device. Under a
plain ``python`` launch the same code runs as a world of one (rank 0 of 1) so there is a single
code path.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mqsa_core.collectives import host_group, loader_group
from mqsa_core.launch_env import export_torch_env
from mqsa_core.log import set_rank


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


def accelerator() -> str:
    """``cuda`` or ``cpu``: ``DS_ACCELERATOR`` if the user set it, else CUDA whenever torch sees
    a GPU. The one place that decides; launch.sh and main.sh leave it to this function."""
    visible = torch.cuda.is_available()
    chosen = os.environ.get("DS_ACCELERATOR") or ("cuda" if visible else "cpu")
    if chosen not in ("cuda", "cpu"):
        raise ValueError(f"DS_ACCELERATOR={chosen!r}: this project runs on cuda or cpu")
    if chosen == "cuda" and not visible:
        raise ValueError("DS_ACCELERATOR=cuda but torch sees no CUDA device")
    return chosen


def init_distributed(timeout_s: int = 600) -> DistEnv:
    """Initialise (once) the default process group from the launcher's environment, or as world
    1: NCCL on CUDA (plus a gloo group for host-side exchanges), gloo on the host."""
    kind = accelerator()
    backend = "nccl" if kind == "cuda" else "gloo"
    os.environ["DS_ACCELERATOR"] = kind  # DeepSpeed reads it when first imported
    local_rank = export_torch_env().local_rank  # before DeepSpeed's own MPI discovery
    if kind == "cuda":
        torch.cuda.set_device(local_rank)
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
            backend, store=dist.HashStore(), rank=0, world_size=1,
            timeout=datetime.timedelta(seconds=timeout_s),
        )  # fmt: skip
    if kind == "cpu":
        _disable_deepspeed_shm_op()
    import deepspeed

    deepspeed.init_distributed(  # adopts an existing default group
        dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s), verbose=False
    )
    host_group()  # collective: every rank creates the host-side groups at the same point
    loader_group()
    set_rank(dist.get_rank())  # the logger's rank-0 filter (mqsa_core.log)
    return DistEnv(
        rank=dist.get_rank(),
        world=dist.get_world_size(),
        local_rank=local_rank,
        local_world=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        device=torch.device("cuda", local_rank) if kind == "cuda" else torch.device("cpu"),
    )


def shutdown() -> None:
    """Leave the process group together: a rank that exits while another still tears down its
    gloo connections can make that rank abort (SIGABRT) after the work is done."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
