"""The hand-written CPU kernel of the paper-mode log-partition (``csrc/catalogue_softmax.cpp``).

On CPU with ``train.bf16``, ``trainer.logpartition`` spends most of a step in three bf16 matrix
products over the whole catalogue and the softmax between them. The kernel computes the score
product ``q . E^T`` (~1.6x faster than oneDNN's at D = 64, the same bf16 scores bitwise) and,
block by block while the scores are in cache, their row-wise softmax AND its transpose, so the
``[rows, N]`` scores are never written to memory; the gradient product ``softmax^T . (w q)`` then
reads a row-major ``[N, rows]`` matrix instead of a transposed view, which oneDNN runs ~1.5x
slower. Same values as torch's softmax of the bf16 scores to bf16 rounding (the transpose is
exact).

It is built once per machine and torch version with the C++ compiler there
(``torch.utils.cpp_extension``, ~30 s, cached under ``$TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``) and needs an x86 CPU with AVX-512 BF16 (AMD Zen 4+, Intel Cooper
Lake / Sapphire Rapids+). Without them, or with ``train.cpu_kernel=false``, oneDNN's products
and torch's softmax run: the same results to bf16 rounding, slower; the log says which.
"""

from __future__ import annotations

import re
import shutil
import sysconfig
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SOURCE = Path(__file__).with_name("csrc") / "catalogue_softmax.cpp"
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16")
COMPILE_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16"]

LOADED = "CPU kernel: fused scores + softmax + transpose (AVX-512 BF16) over the catalogue"

_kernel: ModuleType | None = None


def missing() -> str | None:
    """Why this machine cannot build the kernel, or None if it can."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "no /proc/cpuinfo to read the CPU's features from"
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    lacking = [flag for flag in CPU_FLAGS if flag not in flags]
    if lacking:
        return f"the CPU lacks {', '.join(lacking)}"
    if not (shutil.which("c++") or shutil.which("g++")):
        return "no C++ compiler (apt-get install g++)"
    if not Path(sysconfig.get_paths()["include"], "Python.h").exists():
        return "no Python headers (apt-get install python3-dev)"
    return None


def load() -> str:
    """Build (once per machine) and load the kernel; returns the log line saying what runs."""
    global _kernel
    if _kernel is not None:
        return LOADED
    reason = missing()
    if reason is not None:
        return f"CPU kernel: off ({reason}); oneDNN and torch's softmax run, slower"
    import torch
    from torch.utils.cpp_extension import load as build

    # one build per torch version: a cached build of another one may not link against this one
    name = "mqsa_catalogue_softmax_torch" + re.sub(r"\W", "_", torch.__version__)
    try:
        _kernel = build(
            name, [str(SOURCE)],
            extra_cflags=[*COMPILE_FLAGS, "-fopenmp"], extra_ldflags=["-fopenmp"],
        )  # fmt: skip
    except (RuntimeError, OSError, ImportError) as e:  # reported, never fatal
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"CPU kernel: off (the build failed: {first}); oneDNN and torch's softmax run"
    return LOADED


def transpose_stride(rows: int) -> int:
    """The row stride of a ``[N, rows]`` transpose buffer the kernel writes into: ``rows``
    rounded up to 32, as it writes whole 64-byte lines (and checks the stride)."""
    return _round_up(rows, 32)


def pack_items(table: torch.Tensor) -> torch.Tensor:
    """The item table ``[W, D]`` bf16 as the kernel's product reads it: ``[ceil(W / 16),
    ceil(D / 2), 16]`` int32, word ``[t, k, l]`` the bf16 pair ``E[16 t + l, 2k : 2k + 2]`` (16
    items' pair ``k`` in one 64-byte load; zeros past ``W`` and ``D``)."""
    import torch

    padded = _zero_padded(table, 16, 2)  # [16 T, D'] bf16
    return padded.view(torch.int32).view(-1, 16, padded.shape[1] // 2).transpose(1, 2).contiguous()


def pair_items(table: torch.Tensor) -> torch.Tensor:
    """The item table ``[W, D]`` bf16 as the kernel's ``softmax . E`` reads it: ``[ceil(W / 2),
    D']`` int32 with ``D'`` = ``D`` rounded up to 16, word ``[j, d]`` the bf16 pair ``(E[2j, d],
    E[2j + 1, d])`` (zeros past ``W`` and ``D``)."""
    import torch

    padded = _zero_padded(table, 2, 16)  # [2 J, D'] bf16
    return (
        padded.view(-1, 2, padded.shape[1]).transpose(1, 2).contiguous().view(torch.int32)[..., 0]
    )


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _zero_padded(table: torch.Tensor, row_multiple: int, col_multiple: int) -> torch.Tensor:
    """``table [W, D]`` in a zero tensor whose sizes are rounded up to the multiples."""
    width, dim = table.shape
    padded = table.new_zeros(_round_up(width, row_multiple), _round_up(dim, col_multiple))
    padded[:width, :dim] = table
    return padded


def pairs(queries: torch.Tensor) -> torch.Tensor:
    """Queries ``[R, D]`` bf16 as the kernel's product reads them: contiguous, ``D`` even (a zero
    column added to an odd ``D``, as ``pack_items`` adds to the table)."""
    import torch

    if queries.shape[1] % 2:
        queries = torch.nn.functional.pad(queries, (0, 1))
    return queries.contiguous()


def unload() -> None:
    """Torch's path (oneDNN's products, torch's softmax) from here on (``train.cpu_kernel=false``
    after a run that loaded the kernel)."""
    global _kernel
    _kernel = None


def kernel() -> ModuleType | None:
    """The loaded kernel module, or None (``load`` not called, or it could not build)."""
    return _kernel


@contextmanager
def disabled() -> Iterator[None]:
    """Torch's path inside the block, the kernel after it (side-by-side comparisons)."""
    global _kernel
    saved, _kernel = _kernel, None
    try:
        yield
    finally:
        _kernel = saved
