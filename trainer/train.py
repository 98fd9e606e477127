"""Train MQSA-TED: ``python -m trainer.train CONFIG [key=value ...]``, also under torchrun.

The config is read and checked before torch, DeepSpeed or TorchRec are imported, so a bad
setting is refused in well under a second with one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from mqsa_core import openmp, quiet
from mqsa_core.config import Config, load_config
from mqsa_core.errors import UserError
from mqsa_core.launch_env import launch_env
from trainer.runtime.run_dir import RunDir

TRUST = """\
checkpoints: train.resume loads a checkpoint root (checkpoint.dir, default
<run_dir>/checkpoints) that this project wrote. Every torch file in it (DeepSpeed's model and
ZeRO optimizer states, the per-rank RNG files) is loaded with torch.load(weights_only=True) and
an allowlist of the three DeepSpeed classes its ZeRO 0-2 files hold, so a tampered file is
refused rather than run. A sharded table's torch.distributed.checkpoint metadata is a pickle
that torch reads as is: resume only from checkpoint roots you trust as much as your own runs
(docs/security.md)."""


# what gloo and NCCL say when another rank's process is gone
LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
             "NCCL communicator was aborted", "Socket Timeout")  # fmt: skip


def die_with_launcher() -> None:
    """Under torchrun (Linux), ask the kernel to send this rank SIGTERM when its parent (the
    torchrun agent) dies, so killing ``launch.sh``/torchrun, even with SIGKILL, ends the ranks
    instead of leaving them to train on. (A rank whose torchrun dies before this call cannot
    train either: the rendezvous store lived in torchrun, so its process group never forms.)"""
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


def refuse(error: Exception) -> int:
    """Print ``error: <message>`` (one line, no traceback) and return the exit status 2."""
    print(f"error: {error}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=TRUST, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", help="YAML config file (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=3")
    args = parser.parse_args(argv)
    die_with_launcher()
    quiet.install()  # the third-party warnings we understand (mqsa_core/quiet.py)
    openmp.limit_spinning()  # before torch loads libgomp (mqsa_core/openmp.py)
    try:
        cfg = load_config(args.config, args.overrides)
        launch = launch_env()
    except UserError as e:
        return refuse(e)
    lease, run_dir = None, RunDir(cfg.train.run_dir)
    try:
        if launch.rank == 0:  # the run directory is this job's before anything heavy loads
            lease = run_dir.claim()
            if lease.note:
                print(lease.note, file=sys.stderr, flush=True)
        return train(cfg)
    except UserError as e:  # an error every rank raised alike is printed once per node
        return refuse(e) if launch.local_rank == 0 or not getattr(e, "every_rank", False) else 2
    except KeyboardInterrupt:  # a signal before training, or a second one during it
        print("interrupted (no checkpoint written now; a rerun resumes from the last one)",
              file=sys.stderr)  # fmt: skip
        return 130
    finally:
        if lease is not None:
            run_dir.remove_if_unused()
            lease.release()


def train(cfg: Config) -> int:
    """Train ``cfg`` on this rank; the exit status (0, 2, or 128 + signal when interrupted)."""
    from trainer.runtime.builder import (
        build_run,  # heavy (torch, DeepSpeed): only for a valid config
    )
    from trainer.runtime.distributed import init_distributed, shutdown
    from trainer.runtime.interrupt import Interrupted
    from trainer.runtime.shared_storage import check_shared_storage
    from trainer.runtime.trainer import Trainer, TrainingDiverged

    env = init_distributed()
    check_shared_storage(cfg, env)
    try:
        result = Trainer(build_run(cfg, env)).fit()
    except TrainingDiverged as e:  # every rank knows it: one line for the job, from rank 0
        return refuse(e) if env.is_main else 2
    except Interrupted as e:  # every rank stopped at the same step and saved together
        if env.is_main:
            print(e, file=sys.stderr, flush=True)
        shutdown()
        return e.exit_status
    except RuntimeError as e:
        if not any(sign in str(e) for sign in LOST_PEER):
            raise
        first = str(e).strip().splitlines()[0]
        print(f"error: rank {env.rank} lost its connection to another rank ({first}): a rank or "
              "node stopped; rerun the same command on every node to resume from the newest "
              "checkpoint", file=sys.stderr, flush=True)  # fmt: skip
        return 1
    shutdown()
    if env.is_main:
        test = result["test"]
        print(
            f"best epoch {result['best_epoch']}: test "
            + " ".join(f"{k} {v:.4f}" for k, v in test.items())
            + f"\nmetrics: {cfg.train.run_dir}/metrics.json"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
