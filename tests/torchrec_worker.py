"""Worker for tests/test_torchrec_table.py (1 process, or 2 under torchrun, gloo, CPU).

Usage: python tests/torchrec_worker.py OUT.pt CKPT_DIR   (env FAIL_RANK=r: rank r raises at once)

Every case asserts against an unsharded single-process reference built on every rank from the
same global batch; a failed assertion exits non-zero (torchrun then fails the job). Rank 0 saves
the final tables and the catalogue-mode parameters so that a 2-rank run can be compared with a
1-rank run.
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F

from embeddings import torchrec_table
from embeddings.torchrec_table import TorchRecItemTable, init_rows
from mqsa_core.config import load_config
from trainer.data.batches import BatchBuilder
from trainer.data.samplers import NegativeSampler
from trainer.data.sequences import rank_slice
from trainer.data.teacher import SparseTeacher
from trainer.model.encoder import MQSAEncoder
from trainer.model.objectives import CatalogObjective
from trainer.runtime.distributed import init_distributed, shutdown
from trainer.runtime.engine import build_engine

N, D, LR, WD, STEPS = 1000, 8, 0.1, 0.01, 3
torchrec_table.INIT_BLOCK = 96  # shards then start and end inside init blocks
COEF = torch.linspace(-1.0, 1.0, D)


def global_groups(step: int) -> dict[str, torch.Tensor]:
    """Id groups of the global batch: ``seq [8, 6]`` (with padding), ``neg [10]`` (repeats)."""
    g = torch.Generator().manual_seed(100 + step)
    seq = torch.randint(0, N, (8, 6), generator=g)
    seq[:, :2] = N  # padding
    seq[4:, :] = N  # users 4..7 have no items: rank 1 of 2 looks up nothing from seq
    return {"seq": seq, "neg": torch.randint(0, 40, (10,), generator=g)}


def local_groups(step: int, rank: int, world: int) -> dict[str, torch.Tensor]:
    return {k: v.tensor_split(world)[rank] for k, v in global_groups(step).items()}


def lookup_groups(table: TorchRecItemTable, groups: dict[str, torch.Tensor]) -> dict:
    """All groups in one (collective) lookup: ``{name: [*]}`` ids to ``{name: [*, D]}`` rows."""
    flat = torch.cat([v.reshape(-1) for v in groups.values()])
    rows = table.lookup(flat).split([v.numel() for v in groups.values()])
    return {k: r.view(*v.shape, D) for (k, v), r in zip(groups.items(), rows, strict=True)}


def toy_loss(rows: dict[str, torch.Tensor], items: torch.Tensor | None, world: int) -> torch.Tensor:
    """This rank's loss: repeated rows, padding rows and (optionally) the whole catalogue.

    Scaled like the trainer's losses (times the world size: TorchRec averages the embedding
    gradients over ranks), so the global loss does not depend on the world size.
    """
    loss = world * (((rows["seq"] * COEF).sum(-1) ** 2).sum() + (rows["neg"].sum(0) * COEF).sum())
    if items is not None:
        loss = loss + torch.logsumexp(items @ COEF, 0)
    return loss


def full_table(table: TorchRecItemTable) -> torch.Tensor:
    """``[N, D]`` assembled from every rank's ``export_rows``."""
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, table.export_rows())
    out = torch.full((N, D), float("nan"))
    for ids, vectors in parts:
        out[ids] = vectors
    return out


def reference_step(weight: torch.Tensor, state: torch.Tensor, step: int, world: int,
                   optimizer: str, use_all: bool) -> None:  # fmt: skip
    """One global step of the unsharded reference, in place (``weight [N + 1, D]``)."""
    w = weight.clone().requires_grad_()
    total = 0.0
    for rank in range(world):
        rows = {
            k: F.embedding(v, w, padding_idx=N) for k, v in local_groups(step, rank, world).items()
        }
        total = total + toy_loss(rows, w[:N] if use_all else None, world) / world
    (grad,) = torch.autograd.grad(total, w)
    with torch.no_grad():
        if optimizer == "sgd":
            weight -= LR * grad
            return
        ids = torch.cat([v.reshape(-1) for v in global_groups(step).values()])
        touched = ids[ids != N].unique()
        g = grad[touched] + WD * weight[touched]  # L2 mode
        state[touched] += g.pow(2).mean(1)
        weight[touched] -= LR * g / (state[touched].sqrt().unsqueeze(1) + 1e-8)


def check_table_case(sharding: str, optimizer: str, use_all: bool) -> torch.Tensor:
    world, rank = dist.get_world_size(), dist.get_rank()
    decay = WD if optimizer == "rowwise_adagrad" else 0.0
    table = TorchRecItemTable(N, D, sharding, optimizer, LR, decay, init_std=0.1, seed=3)
    weight = init_rows(0, N + 1, D, 0.1, 3, N)
    state = torch.zeros(N + 1)
    torch.testing.assert_close(full_table(table), weight[:N], rtol=0, atol=0)
    for step in range(STEPS):
        rows = lookup_groups(table, local_groups(step, rank, world))
        loss = toy_loss(rows, table.all_items() if use_all else None, world)
        got_sum = table.item_sum()
        torch.testing.assert_close(got_sum, weight[:N].sum(0), rtol=1e-5, atol=1e-5)
        loss.backward()  # the fused optimizer updates the shards here
        reference_step(weight, state, step, world, optimizer, use_all)
    final = full_table(table)
    torch.testing.assert_close(final, weight[:N], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(table.item_sum(), weight[:N].sum(0), rtol=1e-5, atol=1e-5)
    padding = table.lookup(torch.tensor([N]))
    assert torch.count_nonzero(padding) == 0
    shards = [(tuple(w.shape), row0, col0) for w, row0, col0 in table._shards]
    print(f"[rank {rank}] {sharding}/{optimizer}{'/all_items' if use_all else ''}: OK {shards}")
    return final


def check_checkpoint(ckpt_dir: str) -> None:
    """DCP round trip of the sharded weights and the fused optimizer state."""
    world, rank = dist.get_world_size(), dist.get_rank()
    table = TorchRecItemTable(N, D, "row_wise", "rowwise_adagrad", LR, WD, seed=5)
    lookup_groups(table, local_groups(0, rank, world))["seq"].sum().backward()
    saved_rows = full_table(table)
    dcp.save({"table": table.state_dict(), "opt": table.fused_optimizer.state_dict()},
             checkpoint_id=ckpt_dir)  # fmt: skip
    saved_opt = [v.local_shards()[0].tensor.clone() if v.local_shards() else None
                 for v in _opt_tensors(table)]  # fmt: skip
    toy_loss(lookup_groups(table, local_groups(1, rank, world)), None, world).backward()
    assert not torch.equal(full_table(table), saved_rows)
    state = {"table": table.state_dict(), "opt": table.fused_optimizer.state_dict()}
    dcp.load(state, checkpoint_id=ckpt_dir)
    table.load_state_dict(state["table"])
    table.fused_optimizer.load_state_dict(state["opt"])
    torch.testing.assert_close(full_table(table), saved_rows, rtol=0, atol=0)
    for got, want in zip(_opt_tensors(table), saved_opt, strict=True):
        if want is not None:
            torch.testing.assert_close(got.local_shards()[0].tensor, want, rtol=0, atol=0)
    print(f"[rank {rank}] checkpoint: OK")


def _opt_tensors(table: TorchRecItemTable) -> list:
    state = table.fused_optimizer.state_dict()["state"]
    return [t for per_param in state.values() for t in per_param.values()
            if hasattr(t, "local_shards")]  # fmt: skip


def catalog_run() -> dict[str, torch.Tensor]:
    """Catalogue-mode steps: torchrec table (SGD), MQSAEncoder in DeepSpeed, sampled losses."""
    env_cfg = ["model.dim=8", "model.dropout=0.0", "model.l2=0.0", "train.batch_size=6",
               "embeddings.optimizer=sgd", "embeddings.lr=0.5",
               "loss.candidates=sampled"]  # fmt: skip
    cfg = load_config(None, env_cfg)
    env = init_distributed(timeout_s=120)
    torch.manual_seed(0)
    encoder = MQSAEncoder(cfg.model, max_len=5)
    table = TorchRecItemTable.from_config(cfg.embeddings, cfg.model, N, seed=1, device=env.device)
    gen = torch.Generator().manual_seed(0)
    src = torch.randint(0, N, (3000,), generator=gen).numpy()
    dst = torch.randint(0, 50, (3000,), generator=gen).numpy()
    teacher = SparseTeacher.from_edges(src, dst, src * 0 + 1, N, cfg.model.tau)
    objective = CatalogObjective(encoder, table, teacher, cfg.model, cfg.train)
    engine, _ = build_engine(objective, cfg.train, cfg.distributed, cfg.model.l2, env)
    batches = BatchBuilder(N, teacher, NegativeSampler("uniform", N, 16, seed=2))
    for step in range(STEPS):
        seqs = torch.randint(0, 60, (6, 5), generator=torch.Generator().manual_seed(step))
        seqs[1, :3] = N
        users = rank_slice(torch.arange(6), env.rank, env.world)
        losses = engine(batches(seqs[users], 0, step))
        engine.backward(losses.total)
        engine.step()
    out = {f"encoder.{k}": v.detach().clone() for k, v in encoder.named_parameters()}
    out["table"] = full_table(table)
    out["item_sum"] = table.item_sum()
    torch.testing.assert_close(out["item_sum"], out["table"].sum(0), rtol=1e-5, atol=1e-5)
    print(f"[rank {env.rank}] catalog: OK")
    return out


def main() -> None:
    out, ckpt_dir = sys.argv[1:]
    env = init_distributed(timeout_s=120)
    if os.environ.get("FAIL_RANK") == str(env.rank):
        raise RuntimeError(f"injected failure on rank {env.rank}")
    results = {
        "row_wise/sgd": check_table_case("row_wise", "sgd", use_all=True),
        "table_wise/sgd": check_table_case("table_wise", "sgd", use_all=False),
        "column_wise/sgd": check_table_case("column_wise", "sgd", use_all=False),
        "row_wise/rowwise_adagrad": check_table_case("row_wise", "rowwise_adagrad", False),
    }
    check_checkpoint(ckpt_dir)
    results.update(catalog_run())
    if dist.get_rank() == 0:
        torch.save(results, out)
    shutdown()
    # Skip interpreter finalisation: under load, a C++ thread left by this worker's mix of DCP,
    # fused TorchRec kernels and gloo sometimes aborts the process ("terminate called without
    # an active exception") after all the work above is done and written.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
