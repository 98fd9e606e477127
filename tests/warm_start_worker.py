"""Builds a run warm-started from a previous one and saves what it starts from (1 process or
under torchrun): the encoder state and the whole item table (gathered from the shards).

Usage: python tests/warm_start_worker.py OUT.pt section.key=value ...
"""

import sys

import torch

from core.config import load_config
from tests.dist_worker import gathered_table
from trainer.builder import build_components
from trainer.distributed import init_distributed, shutdown


def main() -> None:
    out, *overrides = sys.argv[1:]
    env = init_distributed()
    run = build_components(load_config(None, overrides), env)
    table = gathered_table(run.table)  # collective
    if env.is_main:
        encoder = {k: v.cpu() for k, v in run.objective.encoder.state_dict().items()}
        torch.save({"encoder": encoder, "table": table}, out)
    shutdown()


if __name__ == "__main__":
    main()
