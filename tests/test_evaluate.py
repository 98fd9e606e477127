"""Evaluation batching: the metrics do not depend on the evaluation batch size, including a
last batch that is empty (users an exact multiple of the batch size)."""

import torch

from mqsa_core.config import load_config
from tests.synthetic import write_prepared
from trainer.evaluation.evaluate import evaluate
from trainer.runtime.builder import build_components
from trainer.runtime.distributed import DistEnv

HOST = DistEnv(rank=0, world=1, local_rank=0, local_world=1, device=torch.device("cpu"))


def test_metrics_do_not_depend_on_the_evaluation_batch_size(tmp_path):
    data = write_prepared(tmp_path / "data", num_users=120)
    cfg = load_config(None, [f"data.dir={data}", "data.max_len=12", "model.dim=16"])
    run = build_components(cfg, HOST)
    count, _ = run.users.eval_batches(60)
    assert count == 3  # 60 + 60 + an empty last batch
    results = [evaluate(run.objective.encoder, run.table, run.users, size) for size in (60, 1024)]
    for split in ("valid", "test"):
        for key, value in results[1][split].items():
            assert abs(results[0][split][key] - value) < 1e-9, (split, key)
