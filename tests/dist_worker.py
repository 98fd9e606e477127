"""Worker for the distributed tests: trains a few steps and saves the model's parameters.

Usage (1 process or under torchrun): python tests/dist_worker.py DATA_DIR OUT.pt STEPS [overrides]
"""

import sys

import torch

from trainer.config import load_config
from trainer.distributed import init_distributed
from trainer.trainer import Trainer


def main() -> None:
    data_dir, out, steps, *overrides = sys.argv[1:]
    cfg = load_config(None, [f"data.dir={data_dir}", "data.max_len=12", "model.dim=16",
                             "model.dropout=0.0", "train.batch_size=32", "train.progress=false",
                             *overrides])  # fmt: skip
    env = init_distributed()
    trainer = Trainer(cfg, env)
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    order = torch.randperm(trainer.seqs.num_users, generator=torch.Generator().manual_seed(0))
    for global_users in order.split(cfg.train.batch_size)[: int(steps)]:
        trainer.train_step(global_users)
    metrics = trainer.evaluate()
    if env.is_main:
        torch.save(
            {"initial": initial, "params": trainer.model.state_dict(), "metrics": metrics}, out
        )


if __name__ == "__main__":
    main()
