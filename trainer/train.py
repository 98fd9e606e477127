"""Train MQSA-TED: ``python -m trainer.train CONFIG [key=value ...]``, also under torchrun."""

from __future__ import annotations

import argparse
import sys

from core.config import load_config
from core.errors import UserError
from trainer.builder import build_run
from trainer.distributed import init_distributed, shutdown
from trainer.trainer import Trainer, TrainingDiverged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", help="YAML config file (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=3")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        env = init_distributed()
        result = Trainer(build_run(cfg, env)).fit()
    except (UserError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
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
