"""Host synchronisations per training step, counted.

    .venv/bin/python bench/host_syncs.py [--steps 3]

Method: a ``TorchDispatchMode`` and a ``TorchFunctionMode`` watch one training step at a time
(forward, backward, optimizer step through the DeepSpeed engine; the batch is built before, as
the prefetching reader does) and count every operation that needs a value of a device tensor
on the host, i.e. that makes the host wait for a GPU: ``.item()``/``bool()``/``int()``/
``float()`` (``_local_scalar_dense``), ``nonzero``, ``unique``, ``masked_select``, boolean-mask
indexing, ``repeat_interleave`` without ``output_size``, ``tolist``, ``numpy``, ``equal``.
It runs on the host (no GPU here), where these ops are cheap but are exactly the ones that
would synchronise on CUDA. Each op is attributed to the first frame of this repository, or to
the library it ran in (TorchRec and DeepSpeed internals are listed separately); our host-side
bookkeeping on host tensors (``HOST_SIDE``: TorchRec's touched-id lists) is reported apart,
since on a GPU it reads no device value.

The cases: paper mode and catalogue mode (dense table), and catalogue mode with the TorchRec
row-wise table, on synthetic prepared data, one process.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import traceback
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SYNC_OPS = {
    "_local_scalar_dense", "nonzero", "_unique2", "unique_dim", "unique_consecutive",
    "masked_select", "is_nonzero", "equal", "allclose",
}  # fmt: skip
SYNC_METHODS = {"tolist", "numpy"}
HOST_SIDE = {"_track"}  # our functions whose tensors are host lists by design
CASES = {
    "paper, dense": ["loss.candidates=all"],
    "catalogue, dense": ["loss.candidates=sampled", "loss.sampler=mixed"],
    "catalogue, torchrec": ["loss.candidates=sampled", "loss.sampler=mixed",
                            "embeddings.backend=torchrec"],
}  # fmt: skip


LIBRARIES = ("torchrec", "fbgemm_gpu", "deepspeed")


def where(stack: list[traceback.FrameSummary]) -> str:
    """Where an op comes from: ``host-side`` when one of our host-bookkeeping functions
    (``HOST_SIDE``) is on the stack; else the innermost frame that is ours (``file:function``)
    or a library's (``<torchrec>``...), torch's own frames skipped."""
    ours = [
        f
        for f in stack
        if ROOT in Path(f.filename).parents
        and "site-packages" not in f.filename
        and Path(f.filename).name != Path(__file__).name
    ]
    if any(f.name in HOST_SIDE for f in ours):
        return "host-side"
    for frame in reversed(stack):
        library = next(
            (lib for lib in LIBRARIES if f"site-packages/{lib}/" in frame.filename), None
        )
        if library:
            return f"<{library}>"
        if frame in ours:
            return f"{Path(frame.filename).relative_to(ROOT)}:{frame.name}"
    return "<torch>"


class SyncCounter(TorchDispatchMode):
    """Counts sync-needing ops (see the module docstring) by the place they come from."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def record(self) -> None:
        self.counts[where(traceback.extract_stack()[:-2])] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        bool_index = name in ("index", "index_put", "index_put_") and any(
            torch.is_tensor(i) and i.dtype == torch.bool for i in (args[1] or ())
        )
        unsized = (
            name == "repeat_interleave"
            and kwargs.get("output_size") is None
            and (len(args) == 1 or torch.is_tensor(args[1]))
        )
        if name in SYNC_OPS or bool_index or unsized:
            self.record()
        return func(*args, **kwargs)


class MethodCounter(TorchFunctionMode):
    def __init__(self, counter: SyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in SYNC_METHODS:
            self.counter.record()
        return func(*args, **(kwargs or {}))


def count_case(data_dir: str, overrides: list[str], steps: int) -> collections.Counter:
    from mqsa_core.config import load_config
    from trainer.runtime.builder import build_run
    from trainer.runtime.distributed import init_distributed
    from trainer.runtime.trainer import Trainer

    cfg = load_config(None, [f"data.dir={data_dir}", "data.max_len=12", "model.dim=16",
                             "train.batch_size=32", "train.progress=false",
                             "loss.num_negatives=16", *overrides])  # fmt: skip
    trainer = Trainer(build_run(cfg, init_distributed()))
    total: collections.Counter[str] = collections.Counter()
    for step, train in enumerate(trainer.users.train_batches(epoch=1)):
        if step == steps + 1:
            break
        batch = trainer.run.batches(train, 1, step)  # built before the step, as when prefetched
        counter = SyncCounter()
        with counter, MethodCounter(counter):
            trainer.train_step(batch, step)
        if step:  # the first step warms up (lazy state)
            total.update(counter.counts)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    from tests.synthetic import write_prepared

    data = write_prepared(Path(tempfile.mkdtemp(prefix="syncs-")) / "data")
    for case, overrides in CASES.items():
        counts = count_case(str(data), overrides, args.steps)
        host = counts.pop("host-side", 0)
        ours = sum(n for k, n in counts.items() if not k.startswith("<"))
        libs = {k: n / args.steps for k, n in counts.items() if k.startswith("<")}
        print(f"{case}: {ours / args.steps:g} host syncs per step in our code; library "
              f"internals {libs or 0}; host-side bookkeeping on host tensors (no device read) "
              f"{host / args.steps:g}")  # fmt: skip
        for place, n in sorted(counts.items()):
            print(f"    {n / args.steps:6.1f}  {place}")


if __name__ == "__main__":
    main()
