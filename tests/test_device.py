"""Every tensor of a training step lives on the run's device.

1. Whole training steps (forward, backward, optimizer) run on the ``meta`` device with every
   component built by ``trainer.runtime.builder``: PyTorch refuses to mix meta and host tensors, so
   a tensor created on the wrong device fails the step, and a meta tensor has no value, so any
   read of a value on the host (``.item()``, a data-dependent shape) fails it too. The only host
   reads of training are in ``Trainer.host_reads``, which the step does not call.
2. A static scan of ``trainer/`` and ``embeddings/``: tensor factories in device-side code name
   their device (or copy one: ``*_like``, ``x.new_*``); host-side code is listed explicitly.
"""

from __future__ import annotations

import ast
from itertools import islice
from pathlib import Path

import pytest
import torch

from mqsa_core.config import load_config
from tests.synthetic import write_prepared
from trainer.data.prefetch import prefetched
from trainer.runtime.builder import build_components
from trainer.runtime.distributed import DistEnv
from trainer.runtime.engine import DivergenceGuard, build_optimizer

ROOT = Path(__file__).resolve().parents[1]
META = DistEnv(rank=0, world=1, local_rank=0, local_world=1, device=torch.device("meta"))
MODES = {
    "paper_full_ted": ["loss.candidates=all"],
    "catalog_sparse_ted": ["loss.candidates=sampled", "loss.sampler=mixed",
                           "loss.num_negatives=16"],
    "catalog_uniform_no_ted": ["loss.candidates=sampled", "loss.sampler=uniform",
                               "model.lambda_kd=0"],
    "paper_transition_term": ["loss.candidates=all", "model.transition_term=true"],
    "catalog_transition_term_no_ted": ["loss.candidates=sampled", "loss.sampler=mixed",
                                       "loss.num_negatives=16", "model.lambda_kd=0",
                                       "model.transition_term=true"],
}  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("meta") / "data")


@pytest.mark.parametrize("mode", list(MODES))
def test_training_steps_run_on_the_meta_device(data_dir, mode):
    cfg = load_config(None, [f"data.dir={data_dir}", "data.max_len=12", "model.dim=16",
                             "train.batch_size=32", "train.bf16=true", *MODES[mode]])  # fmt: skip
    run = build_components(cfg, META)
    optimizer = build_optimizer(run.objective, cfg.train, cfg.model.l2, META.device)
    guard = DivergenceGuard(optimizer, META.device)
    sequences = run.users.train_batches(epoch=1)
    items = ((train, 1, step) for step, train in enumerate(sequences))
    batches = prefetched(items, lambda item: run.batches(*item), META.device)
    for batch in islice(batches, 2):
        assert batch.inputs.device.type == "meta"
        losses = run.objective(batch)
        guard.observe(losses.total)
        losses.total.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses.total.device.type == "meta"
    params = list(run.objective.parameters())
    assert params and all(p.device.type == "meta" for p in params)
    moments = [v for state in optimizer.state.values() for k, v in state.items() if k != "step"]
    assert moments and all(m.device.type == "meta" for m in moments)  # torch keeps "step" on host


# ---------------------------------------------------------------- static scan

FACTORIES = {
    "zeros", "ones", "empty", "full", "arange", "tensor", "rand", "randn", "randint",
    "randperm", "linspace", "logspace", "eye", "as_tensor", "scalar_tensor",
}  # fmt: skip
SCANNED = ("trainer", "embeddings")
# Host-side code, where factories without a device are meant. Whole modules: (path, reason).
HOST_MODULES = {
    "trainer/data/sequences.py": "reads the prepared data into host tensors",
    "trainer/data/user_source.py": "host user batches",
    "trainer/data/user_stream.py": "host user batches streamed from Parquet",
    "trainer/data/samplers.py": "draws candidates on the host, in the prefetching loader",
    "trainer/data/teacher.py": "builds the teacher on the host (the step gathers its device copy)",
    "trainer/data/batches.py": "builds each batch on the host before it moves to the device",
    "trainer/evaluation/baselines.py": "non-learned baselines: a host tool",
    "trainer/runtime/checkpoint.py": "checkpoint I/O: host state read from files",
    "trainer/train.py": "command line",
    "trainer/runtime/warm_start.py": "seeds the tables from a previous run at build time (host)",
    "trainer/model/kernel_check.py": "the CPU kernel's self-check at build time: CPU problems",
}
# Host-side functions inside device-side modules: (path, function) -> reason.
HOST_FUNCTIONS = {
    ("embeddings/base.py", "init_rows"): "seeded initial values, identical on every device",
    ("embeddings/torchrec_table.py", "lookup"): "host de-duplication of host ids (tools, tests)",
    ("embeddings/torchrec_table.py", "all_items"): "host copy of the ids for the bookkeeping",
    ("embeddings/torchrec_table.py", "_held_rows"): "row ids of the shards, a host list",
    ("embeddings/base.py", "export_rows"): "an export's rows are written from the host",
    ("embeddings/torchrec_table.py", "local_rows"): "checks the host list of row ids",
    ("embeddings/torchrec_table.py", "held_ids"): "the host list of held row ids",
    ("embeddings/dense.py", "held_ids"): "the host list of held row ids",
    (
        "trainer/model/encoder.py",
        "__init__",
    ): "seeded parameter init on the host, moved by the builder",
    ("trainer/evaluation/evaluate.py", "eval_split"): "builds the evaluation masks on the host",
    ("trainer/evaluation/evaluate.py", "excluded"): "builds the evaluation masks on the host",
}


def factory_calls_without_device(path: Path) -> list[tuple[str, int, str]]:
    """``(function, line, call)`` of every ``torch.<factory>(...)`` without ``device=``."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else None
            if (
                isinstance(child, ast.Call)
                and isinstance(child.func, ast.Attribute)
                and isinstance(child.func.value, ast.Name)
                and child.func.value.id == "torch"
                and child.func.attr in FACTORIES
                and not any(k.arg == "device" for k in child.keywords)
            ):
                found.append((function, child.lineno, f"torch.{child.func.attr}"))
            visit(child, name or function)

    visit(tree, "<module>")
    return found


def test_step_code_creates_tensors_on_the_device_of_its_inputs():
    offenders = []
    modules = sorted(p for package in SCANNED for p in (ROOT / package).rglob("*.py"))
    assert len(modules) > 10
    for path in modules:
        rel = path.relative_to(ROOT).as_posix()
        if rel in HOST_MODULES:
            continue
        for function, line, call in factory_calls_without_device(path):
            if (rel, function) not in HOST_FUNCTIONS:
                offenders.append(f"{rel}:{line} {call}(...) in {function}() names no device")
    assert not offenders, "\n".join(offenders)


def test_the_host_side_lists_name_existing_code():
    for rel in HOST_MODULES:
        assert (ROOT / rel).exists(), rel
    for rel, function in HOST_FUNCTIONS:
        names = {n.name for n in ast.walk(ast.parse((ROOT / rel).read_text()))
                 if isinstance(n, ast.FunctionDef)}  # fmt: skip
        assert function in names, (rel, function)
