"""The hand-written CPU kernel of the paper-mode log-partition (``csrc/catalogue_softmax.cpp``).

On CPU with ``train.bf16``, ``trainer.model.logpartition`` spends most of a step in three bf16
matrix products over the whole catalogue and the softmax between them. The kernel computes the score
product ``q . E^T`` and, block by block while the scores are in cache, their row-wise softmax
AND its transpose, so the ``[rows, N]`` scores are never written to memory; the gradient product
``softmax^T . (w q)`` then reads a row-major ``[N, rows]`` matrix instead of a transposed view.

A run gets a :class:`CpuKernel` (or None: torch's path) from :func:`select`, once, when it is
built, and hands it to the losses; nothing here is process-global. ``select``

1. checks the CPU's flags (x86 with AVX-512 BF16) and the tools (a C++ compiler, Python's
   headers);
2. builds the extension once per source: the build directory is keyed by the hash of the
   source, the compiler flags, the compiler, torch and Python, under a cache this project owns
   (``$MQSA_KERNEL_CACHE``, default ``~/.cache/mqsa-ted/kernels``), and a build holds an exclusive
   lock there, so two clones or versions never load, rebuild or race each other's build;
3. runs :func:`trainer.model.kernel_check.self_check` on the loaded kernel in this process: every
   entry point the trainer uses against float64, and the whole log-partition with oneDNN's
   products reading the kernel's buffers. Any disagreement beyond bf16 rounding, or anything
   non-finite, turns it off for the run with one line naming what failed.

``MQSA_CPU_FLAGS`` overrides what ``/proc/cpuinfo`` says, for tests and benchmarks only:
``-avx512_bf16`` refuses the kernel as if the CPU lacked the flag; ``+avx512_bf16`` assumes it
(for a VM whose hypervisor hides a flag its CPU has: unsafe where the VM can be migrated).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SOURCE = Path(__file__).with_name("csrc") / "catalogue_softmax.cpp"
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16")
COMPILE_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16"]
FLAGS_OVERRIDE = "MQSA_CPU_FLAGS"
CACHE_ENV = "MQSA_KERNEL_CACHE"
OWNER_MARK = "MQSA_TED_KERNEL_CACHE"  # written first in a cache directory this project made

LOADED = "CPU kernel: on (fused scores + softmax + transpose, AVX-512 BF16; self-check passed)"
FALLBACK = "oneDNN's products and torch's softmax run instead"


_LOADED_MODULES: dict[str, ModuleType] = {}  # by build folder: a process imports a build once


class KernelUnavailable(Exception):
    """Why the kernel cannot run here (the message is the reason, for the log)."""


def cpu_flags() -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo``, with ``MQSA_CPU_FLAGS`` applied
    (``+flag`` adds, ``-flag`` removes; comma- or space-separated)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    flags = set(next((ln.split(":", 1)[1].split() for ln in lines  # x86: flags, Arm: Features
                      if ln.startswith(("flags", "Features"))), []))  # fmt: skip
    for change in re.split(r"[,\s]+", os.environ.get(FLAGS_OVERRIDE, "").strip()):
        if change[:1] == "+":
            flags.add(change[1:])
        elif change[:1] == "-":
            flags.discard(change[1:])
    return flags


def native_bf16() -> bool:
    """Whether the CPU has bf16 instructions (x86 AVX-512 BF16 or AMX, Arm BF16); without them
    torch and oneDNN emulate bf16 products, slower than float32."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


def missing() -> str | None:
    """Why this machine cannot build or run the kernel, or None if it can."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not an x86-64 CPU ({platform.machine()})"
    lacking = [flag for flag in CPU_FLAGS if flag not in cpu_flags()]
    if lacking:
        return f"the CPU lacks {', '.join(lacking)}"
    if compiler() is None:
        return "no C++ compiler (apt-get install g++)"
    if not Path(sysconfig.get_paths()["include"], "Python.h").exists():
        return "no Python headers (apt-get install python3-dev)"
    return None


PROBE = r"""
#include <immintrin.h>
int main() {
  __m512 one = _mm512_set1_ps(1.0f);
  __m512bh pair = _mm512_cvtne2ps_pbh(one, one);
  float out[16];
  _mm512_storeu_ps(out, _mm512_dpbf16_ps(_mm512_setzero_ps(), pair, pair));
  return out[0] == 2.0f ? 0 : 1;
}
"""


def executes_bf16_dot() -> bool:
    """Whether this CPU runs ``vdpbf16ps`` (AVX-512 BF16), tried in a child process (a CPU
    without it kills the child, not us): true on a VM whose hypervisor hides the flag from
    ``/proc/cpuinfo`` while the CPU has it. For tests and benchmarks (``MQSA_CPU_FLAGS``)."""
    cxx = compiler()
    if cxx is None or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    with tempfile.TemporaryDirectory() as tmp:
        source, binary = Path(tmp, "probe.cpp"), Path(tmp, "probe")
        source.write_text(PROBE)
        built = subprocess.run([cxx, "-O1", "-mavx512f", "-mavx512bf16", str(source), "-o",
                                str(binary)], capture_output=True, timeout=120)  # fmt: skip
        return built.returncode == 0 and subprocess.run([str(binary)], timeout=30).returncode == 0


def compiler() -> str | None:
    """The C++ compiler torch's extension builder uses (``$CXX``, else ``c++``), or None."""
    return shutil.which(os.environ.get("CXX", "c++"))


def build_key() -> str:
    """16 hex digits naming one build: the source, the flags, the compiler, torch, Python."""
    import torch

    cxx = compiler() or ""
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
        cxx_version = version.stdout.splitlines()[0] if version.stdout else ""
    except (OSError, subprocess.SubprocessError):
        cxx_version = ""
    digest = hashlib.sha256(SOURCE.read_bytes())
    for part in (*COMPILE_FLAGS, cxx, cxx_version, torch.__version__, sys.version):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:16]


def cache_root() -> Path:
    """Where built kernels live: ``$MQSA_KERNEL_CACHE``, else ``~/.cache/mqsa-ted/kernels``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "mqsa-ted" / "kernels"


def _owned_directory(path: Path) -> Path:
    """``path`` created with our ownership marker, or an existing one that has it."""
    path.mkdir(parents=True, exist_ok=True)
    marker = path / OWNER_MARK
    if not marker.exists():
        if any(entry.name != OWNER_MARK for entry in path.iterdir()):
            raise KernelUnavailable(f"{path} holds files this project did not write")
        marker.write_text("built CPU kernels of mqsa-ted; safe to delete\n")
    return path


def is_built() -> bool:
    """Whether this source's build is in the cache already (a load, not a compile)."""
    return any((cache_root() / build_key()).glob("*.so"))


def build() -> ModuleType:
    """Build (once per :func:`build_key`) and import the extension; raises
    :class:`KernelUnavailable` with the reason."""
    reason = missing()
    if reason is not None:
        raise KernelUnavailable(reason)
    from torch.utils.cpp_extension import load

    key = build_key()
    directory = _owned_directory(cache_root()) / key
    if str(directory) in _LOADED_MODULES:
        return _LOADED_MODULES[str(directory)]
    directory.mkdir(exist_ok=True)
    with open(directory.parent / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when this process ends, however it ends
        (directory / "lock").unlink(missing_ok=True)  # torch's own baton, left by a killed build
        try:
            module = load(
                f"mqsa_catalogue_softmax_{key}", [str(SOURCE)], build_directory=str(directory),
                extra_cflags=[*COMPILE_FLAGS, "-fopenmp"], extra_ldflags=["-fopenmp"],
            )  # fmt: skip
        except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as e:
            text = str(e).strip()
            raise KernelUnavailable(
                f"the build failed: {text.splitlines()[0] if text else type(e).__name__}"
            ) from e
    _LOADED_MODULES[str(directory)] = module
    return module


class CpuKernel:
    """The loaded kernel's three entry points and the operand layouts they read.

    ``trainer.model.logpartition`` calls ``scores`` (the product), ``softmax_rows_and_transpose``
    (the softmax after a score bonus) and ``log_partition_block`` (product, softmax, transpose,
    log-sum-exp and ``softmax . E`` in one pass). Their outputs are bf16 except ``lse`` and
    ``expected`` (float32); a transpose buffer's padding columns are written as zeros.
    """

    def __init__(self, module: ModuleType) -> None:
        self.module = module

    def scores(self, q: torch.Tensor, items: torch.Tensor, out: torch.Tensor) -> None:
        """``out [R, W] = q [R, D'] . E^T`` in bf16 (``q`` from :func:`pairs`, ``items`` from
        :func:`pack_items`)."""
        self.module.scores(q, items, out)

    def softmax_rows_and_transpose(
        self, scores: torch.Tensor, probs: torch.Tensor, probs_t: torch.Tensor
    ) -> None:
        """``probs [R, W]`` = the row-wise softmax of ``scores [R, W]``, ``probs_t [W, R]`` its
        transpose (a :func:`transpose_stride` buffer)."""
        self.module.softmax_rows_and_transpose(scores, probs, probs_t)

    def log_partition_block(
        self, q: torch.Tensor, items: torch.Tensor, paired: torch.Tensor,
        probs_t: torch.Tensor, lse: torch.Tensor, expected: torch.Tensor,
    ) -> None:  # fmt: skip
        """``p = softmax(q . E^T)``: ``probs_t [W, R] = p^T``, ``lse [R]`` each row's log-sum-exp,
        ``expected [R, D'] = p . E`` (``paired`` from :func:`pair_items`)."""
        self.module.log_partition_block(q, items, paired, probs_t, lse, expected)


def select(build_module: Callable[[], ModuleType] = build) -> tuple[CpuKernel | None, str]:
    """``(the checked kernel or None, the log line saying what runs)``: built (or loaded from
    the cache) and self-checked in this process."""
    from trainer.model.kernel_check import self_check

    try:
        kernel = CpuKernel(build_module())
    except KernelUnavailable as e:
        return None, f"CPU kernel: off ({e}); {FALLBACK}"
    failure = self_check(kernel)
    if failure is not None:
        return None, f"CPU kernel: off (self-check failed: {failure}); {FALLBACK}"
    return kernel, LOADED


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
