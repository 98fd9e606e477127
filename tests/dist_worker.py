"""Worker for the distributed tests: trains a few steps per case and saves the results.

Usage (1 process or under torchrun):
    python tests/dist_worker.py DATA_DIR OUT.pt STEPS CASE [CASE ...]
where each CASE is a comma-separated list of config overrides. OUT.pt maps each case to its
initial and final weights (the dense part, plus the gathered item table) and its metrics; a
streaming case (data.stream=true) also holds the in-memory evaluation of the same weights.
"""

import sys
from itertools import islice

import torch
import torch.distributed as dist

from mqsa_core.config import load_config
from trainer.data.user_source import InMemoryUsers
from trainer.evaluation.evaluate import evaluate
from trainer.runtime.builder import build_run
from trainer.runtime.distributed import init_distributed, shutdown
from trainer.runtime.trainer import Trainer

BASE = ["data.max_len=12", "model.dim=16", "model.dropout=0.0", "train.batch_size=32",
        "train.progress=false"]  # fmt: skip


def item_table(trainer: Trainer) -> torch.Tensor:
    """The whole ``[N, D]`` table on every rank (gathered from the shards)."""
    return gathered_table(trainer.table)


def gathered_table(table) -> torch.Tensor:
    """The whole ``[N, D]`` table of an item table on every rank (collective)."""
    first_id, rows = table.local_rows()
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (first_id, rows.detach().cpu()))
    return torch.cat([r for _, r in sorted(parts, key=lambda p: p[0]) if r.numel()])


def snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    params = {k: v.detach().clone() for k, v in trainer.model.encoder.state_dict().items()}
    params["item_table"] = item_table(trainer)
    return params


def run_case(data_dir: str, steps: int, overrides: list[str], env) -> dict:
    cfg = load_config(None, [f"data.dir={data_dir}", *BASE, *overrides])
    trainer = Trainer(build_run(cfg, env))
    initial = snapshot(trainer)
    for step, batch in enumerate(islice(trainer.step_batches(epoch=1), steps)):
        trainer.train_step(batch, step)
    result = {
        "initial": initial,
        "params": snapshot(trainer),
        "metrics": trainer.evaluate(),
    }
    if cfg.data.stream:
        in_memory = InMemoryUsers(cfg.data, cfg.train, env.rank, env.world)
        result["metrics_in_memory"] = evaluate(trainer.model.encoder, trainer.table, in_memory)
    return result


def main() -> None:
    data_dir, out, steps, *cases = sys.argv[1:]
    env = init_distributed()
    results = {case: run_case(data_dir, int(steps), case.split(","), env) for case in cases}
    if env.is_main:
        torch.save(results, out)
    shutdown()


if __name__ == "__main__":
    main()
