"""Which process this is: rank, world, local rank, whichever launcher started it.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` (and the
rendezvous address). Launchers that start every rank themselves set their own variables:

- torchrun: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``;
- Open MPI's ``mpirun``: ``OMPI_COMM_WORLD_RANK``, ``_SIZE``, ``_LOCAL_RANK``, ``_LOCAL_SIZE``;
- MPICH / Intel MPI (PMI): ``PMI_RANK``, ``PMI_SIZE``, ``MPI_LOCALRANKID``, ``MPI_LOCALNRANKS``;
- Slurm's ``srun``: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, and the local world
  from ``SLURM_NTASKS_PER_NODE`` or ``SLURM_TASKS_PER_NODE`` (this node's entry).

:func:`export_torch_env` writes the torchrun names from whichever is found first in that order
(torchrun first: under ``srun ... torchrun`` its ranks carry both), plus the rendezvous address
``MASTER_ADDR`` (under Slurm the first host of ``SLURM_JOB_NODELIST`` unless set) and
``MASTER_PORT`` (default 29500). The device of a rank is ``cuda:<local rank>``. Light: no torch.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from mqsa_core.errors import UserError

DEFAULT_PORT = "29500"
# (launcher, rank, world, local rank, local world); None: derived (Slurm's local world)
LAUNCHERS = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    ("mpirun (Open MPI)", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
     "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("mpirun (PMI)", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ("srun", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", None),
)  # fmt: skip


class LaunchError(UserError):
    """The launcher's environment is incomplete or inconsistent."""


@dataclass(frozen=True)
class LaunchEnv:
    """This process's place in the job."""

    launcher: str  # torchrun, srun, mpirun (...), or "single process"
    rank: int
    world: int
    local_rank: int
    local_world: int

    @property
    def device_index(self) -> int:
        """The GPU this rank uses on its node."""
        return self.local_rank


def tasks_on_node(tasks_per_node: str, node: int) -> int:
    """The task count of node ``node`` from Slurm's ``SLURM_TASKS_PER_NODE`` (``2(x3),1``: three
    nodes of 2 tasks, then one of 1)."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise LaunchError(f"SLURM_TASKS_PER_NODE={tasks_per_node!r} cannot be read")
        counts += [int(match[1])] * int(match[2] or 1)
    if not 0 <= node < len(counts):
        raise LaunchError(f"SLURM_NODEID={node} but SLURM_TASKS_PER_NODE={tasks_per_node!r}")
    return counts[node]


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list (``gpu[03-05,09],cpu1`` -> ``gpu03``)."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if match is None:
        raise LaunchError(f"cannot read the Slurm node list {nodelist!r}")
    prefix, ranges = match[1], match[2]
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def _integer(environ: Mapping[str, str], name: str) -> int:
    value = environ.get(name, "")
    if not value.strip().isdigit():
        raise LaunchError(f"{name}={value!r} is not a non-negative integer")
    return int(value)


def launch_env(environ: Mapping[str, str] = os.environ) -> LaunchEnv:
    """This process's rank, world, local rank and local world from the first launcher whose
    rank variable is set (module docstring); a single process when none is."""
    for launcher, rank, world, local_rank, local_world in LAUNCHERS:
        if rank not in environ:
            continue
        if local_world is not None:
            local_size = _integer(environ, local_world) if local_world in environ else 1
        elif "SLURM_NTASKS_PER_NODE" in environ:
            local_size = _integer(environ, "SLURM_NTASKS_PER_NODE")
        else:
            node = _integer(environ, "SLURM_NODEID") if "SLURM_NODEID" in environ else 0
            local_size = tasks_on_node(environ.get("SLURM_TASKS_PER_NODE", "1"), node)
        found = LaunchEnv(
            launcher,
            _integer(environ, rank),
            _integer(environ, world) if world in environ else 1,
            _integer(environ, local_rank) if local_rank in environ else 0,
            local_size,
        )
        if not (found.rank < found.world and found.local_rank < found.local_world):
            raise LaunchError(
                f"{launcher}: rank {found.rank} of {found.world}, local rank {found.local_rank} "
                f"of {found.local_world}: the launcher's variables disagree"
            )
        return found
    return LaunchEnv("single process", 0, 1, 0, 1)


def export_torch_env(environ: MutableMapping[str, str] = os.environ) -> LaunchEnv:
    """:func:`launch_env`, written into ``environ`` under torchrun's names (what torch and
    DeepSpeed read), with the rendezvous address; a single process writes nothing."""
    env = launch_env(environ)
    if env.launcher in ("torchrun", "single process"):
        return env
    if "MASTER_ADDR" not in environ:
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
        if nodelist is None:
            raise LaunchError(
                f"started by {env.launcher} as rank {env.rank} of {env.world}, but MASTER_ADDR "
                "(the host of rank 0) is not set: export it to every rank (mpirun -x "
                "MASTER_ADDR=host -x MASTER_PORT=port), docs/scaling.md"
            )
        environ["MASTER_ADDR"] = first_host(nodelist)
    environ.setdefault("MASTER_PORT", DEFAULT_PORT)
    environ.update(
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world),
        LOCAL_RANK=str(env.local_rank),
        LOCAL_WORLD_SIZE=str(env.local_world),
    )
    return env
