"""Every launcher's environment maps to the same rank, local rank, world and device index
(``mqsa_core.launch_env``): torchrun, Slurm's ``srun``, Open MPI's and MPICH's ``mpirun``, set by
hand as each launcher sets them; and ranks started with only Open MPI's variables form a real
process group."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mqsa_core.launch_env import (
    LaunchError,
    export_torch_env,
    first_host,
    launch_env,
    tasks_on_node,
)
from tests.test_launch import free_port

ROOT = Path(__file__).resolve().parents[1]

# rank 5 of 8: the second rank of node 2 (of 4 nodes x 2 processes), as each launcher says it
LAUNCHERS = {
    "torchrun": {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                 "MASTER_ADDR": "n0", "MASTER_PORT": "29500"},
    "srun": {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
             "SLURM_TASKS_PER_NODE": "2(x4)", "SLURM_JOB_NODELIST": "gpu[07-10]"},
    "mpirun (Open MPI)": {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8",
                          "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
                          "MASTER_ADDR": "n0"},
    "mpirun (PMI)": {"PMI_RANK": "5", "PMI_SIZE": "8", "MPI_LOCALRANKID": "1",
                     "MPI_LOCALNRANKS": "2", "MASTER_ADDR": "n0"},
}  # fmt: skip


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_every_launcher_gives_the_same_rank_world_and_device(launcher):
    environ = dict(LAUNCHERS[launcher])
    env = export_torch_env(environ)
    assert env.launcher == launcher
    assert (env.rank, env.world, env.local_rank, env.local_world) == (5, 8, 1, 2)
    assert env.device_index == 1
    assert (environ["RANK"], environ["WORLD_SIZE"]) == ("5", "8")
    assert (environ["LOCAL_RANK"], environ["LOCAL_WORLD_SIZE"]) == ("1", "2")
    assert environ["MASTER_ADDR"] == ("gpu07" if launcher == "srun" else "n0")
    assert environ["MASTER_PORT"] == "29500"


def test_torchrun_under_srun_wins_and_a_plain_process_is_rank_0_of_1():
    both = {**LAUNCHERS["srun"], "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "1"}  # fmt: skip
    assert launch_env(both).launcher == "torchrun" and launch_env(both).rank == 3
    single = launch_env({})
    assert (single.launcher, single.rank, single.world, single.local_rank) == (
        "single process", 0, 1, 0,
    )  # fmt: skip


def test_slurm_lists_and_bad_variables():
    assert first_host("gpu[03-05,09],cpu1") == "gpu03"
    assert first_host("node17") == "node17"
    assert tasks_on_node("2(x3),1", 3) == 1
    assert tasks_on_node("4", 0) == 4
    uneven = {**LAUNCHERS["srun"], "SLURM_TASKS_PER_NODE": "2(x2),3,1", "SLURM_NODEID": "2"}
    assert launch_env(uneven).local_world == 3
    with pytest.raises(LaunchError, match="MASTER_ADDR"):
        export_torch_env({k: v for k, v in LAUNCHERS["mpirun (PMI)"].items() if k != "MASTER_ADDR"})
    with pytest.raises(LaunchError, match="disagree"):
        launch_env({"OMPI_COMM_WORLD_RANK": "8", "OMPI_COMM_WORLD_SIZE": "8"})
    with pytest.raises(LaunchError, match="not a non-negative integer"):
        launch_env({"PMI_RANK": "one", "PMI_SIZE": "2"})


def test_ranks_started_like_mpirun_form_one_process_group(tmp_path):
    """Two processes with only Open MPI's variables (what ``mpirun -np 2`` sets) and the
    rendezvous address: ``init_distributed`` gives each its rank, the world and its device."""
    code = (
        "from trainer.runtime.distributed import init_distributed, shutdown;"
        "import torch.distributed as dist;"
        "env = init_distributed(timeout_s=60);"
        "print(env.rank, env.world, env.local_rank, env.device, dist.get_world_size());"
        "shutdown()"
    )
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        environ = {
            k: v for k, v in os.environ.items() if not k.startswith(("RANK", "LOCAL_", "WORLD"))
        }
        environ.update(
            PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port, OMPI_COMM_WORLD_RANK=str(rank), OMPI_COMM_WORLD_SIZE="2",
            OMPI_COMM_WORLD_LOCAL_RANK=str(rank), OMPI_COMM_WORLD_LOCAL_SIZE="2",
        )  # fmt: skip
        procs.append(
            subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=environ,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )  # fmt: skip
    outputs = [p.communicate(timeout=180) for p in procs]
    for rank, (proc, (out, err)) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, err
        assert out.split() == [str(rank), "2", str(rank), "cpu", "2"], out
