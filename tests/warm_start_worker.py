"""Builds a run warm-started from a previous one and saves what it starts from (1 process or
under torchrun): the encoder state, the whole item table (gathered from the shards), the dense
optimizer's state by parameter name (as optimizer.pt holds it) and a sharded table's fused
optimizer state (gathered).

Usage: python tests/warm_start_worker.py OUT.pt section.key=value ...
"""

import sys

import torch
import torch.distributed as dist

from mqsa_core.config import load_config
from tests.dist_worker import gathered_table
from trainer.runtime.builder import build_run
from trainer.runtime.distributed import init_distributed, shutdown
from trainer.runtime.optimizer_state import named_optimizer_state


def gathered_fused_state(table) -> dict[str, torch.Tensor]:
    """Each state tensor of a row-sharded table's fused optimizer, whole (``[N, ...]``, the
    padding row left out), on every rank (collective)."""
    out = {}
    for states in table.fused_optimizer.state_dict()["state"].values():
        for name, sharded in states.items():
            local = [(s.metadata.shard_offsets[0], s.tensor.cpu()) for s in sharded.local_shards()]
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, local)
            rows = sorted((p for part in parts for p in part), key=lambda p: p[0])
            out[name] = torch.cat([t for _, t in rows])[: table.num_items]
    return out


def main() -> None:
    out, *overrides = sys.argv[1:]
    env = init_distributed()
    run = build_run(load_config(None, overrides), env)
    table = gathered_table(run.table)  # collective
    fused = gathered_fused_state(run.table) if run.table.has_fused_optimizer else {}
    dense = named_optimizer_state(run.objective, run.guard.optimizer, 0)  # collective (ZeRO 1/2)
    if env.is_main:
        encoder = {k: v.cpu() for k, v in run.objective.encoder.state_dict().items()}
        saved = {
            "encoder": encoder,
            "table": table,
            "optimizer": dense["state"] if dense else {},
            "fused": fused,
        }
        torch.save(saved, out)
    shutdown()


if __name__ == "__main__":
    main()
