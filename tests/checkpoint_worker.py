"""Loads the newest complete checkpoint of a run into a fresh trainer and saves its weights
(the encoder's and the whole item table, gathered from the shards).

Usage (1 process or under torchrun): python tests/checkpoint_worker.py CONFIG OUT.pt [overrides]
"""

import sys

import torch

from mqsa_core.config import load_config
from tests.dist_worker import item_table
from trainer.runtime.builder import build_run
from trainer.runtime.distributed import init_distributed, shutdown
from trainer.runtime.trainer import Trainer


def main() -> None:
    config, out, *overrides = sys.argv[1:]
    env = init_distributed()
    trainer = Trainer(build_run(load_config(config, [*overrides, "train.resume=auto"]), env))
    state = trainer.start_state()
    table = item_table(trainer)  # collective: every rank takes part
    if env.is_main:
        params = {**trainer.model.encoder.state_dict(), "item_table": table}
        torch.save({"params": params, "epoch": state.epoch}, out)
    shutdown()


if __name__ == "__main__":
    main()
