"""How a run gets (or does not get) the CPU kernel: every branch of ``cpu_kernels.select`` says
why in one line and leaves torch's path, which then trains; the build cache is keyed by the
source's hash in a folder this project owns. The CPU's flags are set with ``MQSA_CPU_FLAGS``, so
these run on any x86 machine with a compiler (the self-check's tests need the real kernel)."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import pytest
import torch

from mqsa_core.config import load_config
from tests.synthetic import write_prepared
from trainer.data.prefetch import prefetched
from trainer.model import cpu_kernels, kernel_check
from trainer.runtime.builder import build_components
from trainer.runtime.distributed import DistEnv
from trainer.runtime.engine import DivergenceGuard, build_optimizer

HOST = DistEnv(rank=0, world=1, local_rank=0, local_world=1, device=torch.device("cpu"))
ALL_FLAGS = " ".join(f"+{flag}" for flag in cpu_kernels.CPU_FLAGS)
needs_the_kernel = pytest.mark.skipif(
    cpu_kernels.missing() is not None, reason=f"CPU kernel: {cpu_kernels.missing()}"
)


def test_a_cpu_without_avx512_bf16_gets_torchs_path(monkeypatch):
    monkeypatch.setenv(cpu_kernels.FLAGS_OVERRIDE, "-avx512_bf16")
    kernel, message = cpu_kernels.select()
    assert kernel is None
    expected = f"CPU kernel: off (the CPU lacks avx512_bf16); {cpu_kernels.FALLBACK}"
    assert message == expected or "not an x86-64 CPU" in message


def test_no_compiler_gets_torchs_path(monkeypatch):
    monkeypatch.setenv(cpu_kernels.FLAGS_OVERRIDE, ALL_FLAGS)
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    kernel, message = cpu_kernels.select()
    assert kernel is None
    assert "no C++ compiler" in message or "not an x86-64 CPU" in message


@pytest.mark.skipif(cpu_kernels.compiler() is None, reason="no C++ compiler")
def test_a_failed_build_gets_torchs_path_and_leaves_other_builds_alone(monkeypatch, tmp_path):
    monkeypatch.setenv(cpu_kernels.FLAGS_OVERRIDE, ALL_FLAGS)
    monkeypatch.setenv(cpu_kernels.CACHE_ENV, str(tmp_path / "cache"))
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++;\n")
    monkeypatch.setattr(cpu_kernels, "SOURCE", broken)
    kernel, message = cpu_kernels.select()
    assert kernel is None
    assert message.startswith("CPU kernel: off (the build failed: ")
    assert message.endswith(cpu_kernels.FALLBACK)
    # the broken source has its own folder, next to the ownership marker
    names = {p.name for p in (tmp_path / "cache").iterdir()}
    assert cpu_kernels.OWNER_MARK in names and cpu_kernels.build_key() in names


def test_the_build_cache_is_keyed_by_the_source(monkeypatch, tmp_path):
    key = cpu_kernels.build_key()
    changed = tmp_path / "catalogue_softmax.cpp"
    changed.write_text(cpu_kernels.SOURCE.read_text() + "// another version\n")
    monkeypatch.setattr(cpu_kernels, "SOURCE", changed)
    assert cpu_kernels.build_key() != key
    monkeypatch.setenv(cpu_kernels.CACHE_ENV, str(tmp_path / "cache"))
    assert cpu_kernels.cache_root() == tmp_path / "cache"
    assert Path.home() / ".cache" / "mqsa-ted" / "kernels" != cpu_kernels.cache_root()


def test_a_kernel_cache_holding_someone_elses_files_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv(cpu_kernels.FLAGS_OVERRIDE, ALL_FLAGS)
    folder = tmp_path / "theirs"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    monkeypatch.setenv(cpu_kernels.CACHE_ENV, str(folder))
    if cpu_kernels.missing() is not None:
        pytest.skip(cpu_kernels.missing())
    kernel, message = cpu_kernels.select()
    assert kernel is None and "holds files this project did not write" in message
    assert (folder / "notes.txt").read_text() == "mine" and len(list(folder.iterdir())) == 1


class WrongScores(cpu_kernels.CpuKernel):
    """The real kernel with a score product off by 1% (what another CPU's instructions might
    give)."""

    def scores(self, q, items, out) -> None:
        super().scores(q, items, out)
        out.mul_(1.01)


class NaNPadding(cpu_kernels.CpuKernel):
    """The real kernel, but the transpose's padding left as NaN (the bug that stopped the main
    job on an Intel Xeon: oneDNN's AMX product read it)."""

    def softmax_rows_and_transpose(self, scores, probs, probs_t) -> None:
        super().softmax_rows_and_transpose(scores, probs, probs_t)
        full = probs_t.as_strided((probs_t.shape[0], probs_t.stride(0)), (probs_t.stride(0), 1))
        full[:, probs_t.shape[1] :] = float("nan")


@needs_the_kernel
def test_the_self_check_passes_on_the_kernel_and_names_what_fails(tmp_path):
    module = cpu_kernels.build()
    assert kernel_check.self_check(cpu_kernels.CpuKernel(module)) is None
    assert kernel_check.self_check(WrongScores(module)).startswith("scores [")
    assert "padding columns are not zeros" in kernel_check.self_check(NaNPadding(module))


@needs_the_kernel
def test_a_failed_self_check_falls_back_and_training_goes_on(monkeypatch, tmp_path, capsys):
    """Forced to fail, the check turns the kernel off with one line, and training steps run on
    torch's path with finite losses."""
    monkeypatch.setattr(cpu_kernels, "CpuKernel", WrongScores)
    data = write_prepared(tmp_path / "data", num_users=80, num_items=37)
    cfg = load_config(None, [f"data.dir={data}", "data.max_len=12", "model.dim=16",
                             "train.batch_size=32", "train.bf16=true", "embeddings.backend=dense",
                             "model.transition_term=false"])  # fmt: skip
    run = build_components(cfg, HOST)
    lines = [line for line in capsys.readouterr().out.splitlines() if "CPU kernel" in line]
    assert len(lines) == 1 and lines[0].startswith("CPU kernel: off (self-check failed: scores [")
    assert run.objective.kernel is None
    optimizer = build_optimizer(run.objective, cfg.train, cfg.model.l2, HOST.device)
    guard = DivergenceGuard(optimizer, HOST.device)
    items = ((train, 1, step) for step, train in enumerate(run.users.train_batches(epoch=1)))
    for batch in islice(prefetched(items, lambda item: run.batches(*item), HOST.device), 3):
        losses = run.objective(batch)
        guard.observe(losses.total)
        losses.total.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert guard.skipped() == 0
