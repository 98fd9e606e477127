"""The CPU kernel proves itself where it runs: :func:`self_check` against float64.

A kernel that is right on one CPU can be wrong on another: other instructions behind the same
flags, another oneDNN path reading the kernel's buffers (oneDNN's AMX matmul reads an operand's
padding up to its row stride). So ``trainer.model.cpu_kernels.select`` runs this check in the
process that trains, once, before the kernel is used (~35 ms here), on random problems that cover

- partial register tiles and blocks (rows and widths not multiples of 8, 16 or 32; one row,
  one item), odd and small ``D``;
- scores from about 1 up to a few hundred, as large as the distillation's ``tau = 0.1`` makes
  them;
- every entry point the trainer calls (``scores``, ``softmax_rows_and_transpose``,
  ``log_partition_block``), and the whole ``weighted_log_partition`` (value and the gradients
  of the queries, the table and a score bonus, with and without the zero column) with every
  scratch buffer first filled with NaN, as a reused buffer may be, so a product that reads
  anything the kernel left unwritten shows up here.

The reference is float64 on the same bf16 inputs, with the scores rounded to bf16 where torch's
bf16 path rounds them (a score of 300 has a bf16 spacing of 2, which moves its softmax by e^2:
that is bf16 itself, not the kernel); the tolerances are bf16 rounding with margin, never bitwise
equality with a library whose kernels differ by ISA.
"""

from __future__ import annotations

import torch

from trainer.model import cpu_kernels, logpartition
from trainer.model.cpu_kernels import CpuKernel
from trainer.model.transition_term import ScoreBonus

BF16_ULP = 2.0**-7  # bf16's spacing relative to a value: its rounding is half of it
GRADIENT_RTOL = 2.0**-5  # normwise, for sums of many bf16-rounded terms

# (rows, width, dim, largest |score|)
PRODUCTS = [(1, 1, 2, 1.0), (7, 5, 3, 30.0), (9, 17, 8, 300.0), (33, 49, 31, 100.0),
            (70, 1003, 64, 300.0)]  # fmt: skip
# (rows, width, largest |score|)
SOFTMAXES = [(1, 1, 1.0), (3, 5, 30.0), (33, 100, 300.0), (70, 1003, 100.0)]
# (rows, width, dim, largest |score|)
BLOCKS = [(1, 3, 2, 1.0), (9, 17, 3, 30.0), (33, 49, 31, 300.0), (70, 1003, 64, 100.0)]
# (rows, width, dim, chunk, largest |score|, zero column, score bonus); without the zero column
# each row is anchored at its highest score, as TED anchors a head at its own item
LOG_PARTITIONS = [
    (45, 203, 31, 40, 30.0, True, False), (45, 203, 64, 40, 300.0, False, False),
    (70, 130, 64, 32, 30.0, True, True), (13, 77, 5, 8, 100.0, False, True),
]  # fmt: skip


class CheckFailed(Exception):
    """What disagreed (the message names the entry point, the shape and the error)."""


def self_check(kernel: CpuKernel) -> str | None:
    """None when every problem agrees with float64 within bf16 tolerance and nothing is
    non-finite; else what failed first. Leaves the scratch buffers empty (zeroed on the next
    allocation)."""
    generator = torch.Generator().manual_seed(20241207)
    try:
        for rows, width, dim, top in PRODUCTS:
            check_scores(kernel, *problem(rows, width, dim, top, generator))
        for rows, width, top in SOFTMAXES:
            check_softmax(kernel, rows, width, top, generator)
        for rows, width, dim, top in BLOCKS:
            check_block(kernel, *problem(rows, width, dim, top, generator))
        for rows, width, dim, chunk, top, zero_column, bonus in LOG_PARTITIONS:
            check_log_partition(kernel, rows, width, dim, chunk, top, zero_column, bonus, generator)
    except CheckFailed as e:
        return str(e)
    except RuntimeError as e:  # the kernel refused an operand it should take
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"
    finally:
        logpartition.reset_workspace()
    return None


def problem(
    rows: int, width: int, dim: int, top: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(queries [rows, dim], table [width, dim])`` in bf16 whose largest |score| is ``top``."""
    queries = torch.randn(rows, dim, generator=generator, dtype=torch.float64)
    table = torch.randn(width, dim, generator=generator, dtype=torch.float64) * 0.5
    queries *= top / (queries @ table.T).abs().max().clamp(min=1e-6)
    return queries.to(torch.bfloat16), table.to(torch.bfloat16)


def expect_close(what: str, got: torch.Tensor, want: torch.Tensor, tol: torch.Tensor) -> None:
    """Raise :class:`CheckFailed` unless ``got`` is finite and within ``tol`` of ``want``."""
    got = got.double()
    if not torch.isfinite(got).all():
        raise CheckFailed(f"{what}: {int((~torch.isfinite(got)).sum())} non-finite value(s)")
    excess = (got - want).abs() - tol
    if (excess > 0).any():
        worst = int(excess.flatten().argmax())
        allowed = tol.expand_as(want).flatten()[worst].item()
        raise CheckFailed(
            f"{what}: {got.flatten()[worst].item():.6g} where float64 gives "
            f"{want.flatten()[worst].item():.6g} (tolerance {allowed:.3g})"
        )


def expect_close_normwise(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """``||got - want|| <= GRADIENT_RTOL ||want||`` and ``got`` finite."""
    got = got.double()
    if not torch.isfinite(got).all():
        raise CheckFailed(f"{what}: {int((~torch.isfinite(got)).sum())} non-finite value(s)")
    error, scale = (got - want).norm().item(), want.norm().item()
    if error > GRADIENT_RTOL * scale + 1e-9:
        relative = error / max(scale, 1e-300)
        raise CheckFailed(f"{what}: relative error {relative:.3g} > {GRADIENT_RTOL:.3g}")


def check_scores(kernel: CpuKernel, queries: torch.Tensor, table: torch.Tensor) -> None:
    rows, width = queries.shape[0], table.shape[0]
    out = torch.full((rows, width), float("nan"), dtype=torch.bfloat16)
    kernel.scores(cpu_kernels.pairs(queries), cpu_kernels.pack_items(table), out)
    want = queries.double() @ table.double().T
    # the bf16 rounding of the output (within one ulp: float32 sums may round the other way)
    bound = queries.double().abs() @ table.double().abs().T
    expect_close(f"scores [{rows}, {width}] D={table.shape[1]}", out, want,
                 BF16_ULP * want.abs() + 1e-5 * bound)  # fmt: skip


def check_softmax(
    kernel: CpuKernel, rows: int, width: int, top: float, generator: torch.Generator
) -> None:
    scores = (torch.rand(rows, width, generator=generator, dtype=torch.float64) * 2 - 1) * top
    scores = scores.to(torch.bfloat16)
    probs = torch.full_like(scores, float("nan"))
    stride = cpu_kernels.transpose_stride(rows)
    probs_t = torch.full((width, stride), float("nan"), dtype=torch.bfloat16)[:, :rows]
    kernel.softmax_rows_and_transpose(scores, probs, probs_t)
    want = torch.softmax(scores.double(), dim=1)
    what = f"softmax_rows_and_transpose [{rows}, {width}]"
    expect_close(what, probs, want, BF16_ULP * want + 1e-30)
    if not torch.equal(probs_t, probs.T):
        raise CheckFailed(f"{what}: the transpose differs from the softmax")
    check_padding(what, probs_t, stride)


def check_padding(what: str, probs_t: torch.Tensor, stride: int) -> None:
    """The transpose buffer's columns past its rows (up to the stride) hold zeros."""
    full = probs_t.as_strided((probs_t.shape[0], stride), (stride, 1))
    if full[:, probs_t.shape[1] :].ne(0).any():
        raise CheckFailed(f"{what}: the transpose's padding columns are not zeros")


def check_block(kernel: CpuKernel, queries: torch.Tensor, table: torch.Tensor) -> None:
    rows, width = queries.shape[0], table.shape[0]
    packed, paired = cpu_kernels.pack_items(table), cpu_kernels.pair_items(table)
    stride = cpu_kernels.transpose_stride(rows)
    probs_t = torch.full((width, stride), float("nan"), dtype=torch.bfloat16)[:, :rows]
    lse = torch.full((rows,), float("nan"))
    expected = torch.full((rows, paired.shape[1]), float("nan"))
    kernel.log_partition_block(cpu_kernels.pairs(queries), packed, paired, probs_t, lse, expected)
    scores = torch.empty(rows, width, dtype=torch.bfloat16)  # the product, checked on its own
    kernel.scores(cpu_kernels.pairs(queries), packed, scores)
    scores = scores.double()
    probs = torch.softmax(scores, dim=1)
    what = f"log_partition_block [{rows}, {width}] D={table.shape[1]}"
    top = scores.abs().amax(dim=1)  # a score's rounding moves the log-sum-exp by as much
    expect_close(f"{what} lse", lse, torch.logsumexp(scores, dim=1), BF16_ULP * (top + 1))
    expect_close(f"{what} softmax^T", probs_t, probs.T, BF16_ULP * probs.T + 1e-30)
    check_padding(what, probs_t, stride)
    want = probs @ table.double()
    expect_close_normwise(f"{what} softmax . E", expected[:, : table.shape[1]], want)


def check_log_partition(
    kernel: CpuKernel, rows: int, width: int, dim: int, chunk: int, top: float,
    zero_column: bool, with_bonus: bool, generator: torch.Generator,
) -> None:  # fmt: skip
    """The whole ``weighted_log_partition`` with the kernel (oneDNN's products reading its
    buffers, pre-filled with NaN) against float64 autograd."""
    q16, t16 = problem(rows, width, dim, top, generator)
    queries, table = q16.float().requires_grad_(), t16.float().requires_grad_()
    weights = torch.rand(rows, generator=generator, dtype=torch.float64).float()
    anchors = None if zero_column else (q16.double() @ t16.double().T).argmax(dim=1)
    bonus = None
    if with_bonus:
        cells = torch.randperm(rows * width, generator=generator)[: 3 * rows]
        values = (torch.rand(cells.shape[0], generator=generator, dtype=torch.float64) * 4).float()
        bonus = ScoreBonus(cells // width, cells % width, values.requires_grad_())
    inputs = [queries, table, *([bonus.values] if bonus else [])]

    def run() -> list[torch.Tensor]:
        value = logpartition.weighted_log_partition(
            queries, table, weights, chunk, True, zero_column, bonus, anchors, kernel
        )
        return [value.detach(), *torch.autograd.grad(value, inputs)]

    run()  # allocates this problem's scratch buffers
    logpartition.fill_workspace(float("nan"))
    got = run()
    want = float64_log_partition(q16, t16, weights, zero_column, bonus)
    what = f"weighted_log_partition [{rows}, {width}] D={dim} chunk {chunk}" + (
        " with a score bonus" if bonus else ""
    )
    scores = queries.detach().double() @ table.detach().double().T
    bound = (weights.double() * (scores.abs().amax(dim=1) + 1)).sum()
    expect_close(f"{what}: value", got[0], want[0], BF16_ULP * bound)
    for name, g, w in zip(("d/dqueries", "d/dtable", "d/dbonus"), got[1:], want[1:], strict=False):
        expect_close_normwise(f"{what}: {name}", g, w)


def float64_log_partition(
    queries: torch.Tensor, table: torch.Tensor, weights: torch.Tensor, zero_column: bool,
    bonus: ScoreBonus | None,
) -> list[torch.Tensor]:  # fmt: skip
    """``[value, d/dqueries, d/dtable, (d/dbonus)]`` of ``sum_r w_r logsumexp_j(s_rj)`` in float64,
    ``s = q . E^T`` rounded to bf16 as torch's bf16 path rounds it (plus the bonus, rounded again;
    the zero column, when there is one, as one more score of 0)."""
    q, e, w = queries.double(), table.double(), weights.double()
    scores = (q @ e.T).to(torch.bfloat16)  # [R, W]
    if bonus is not None:
        added = scores[bonus.rows, bonus.items] + bonus.values.detach().to(torch.bfloat16)
        scores[bonus.rows, bonus.items] = added
    scores = scores.double()
    if zero_column:
        scores = torch.cat([scores, scores.new_zeros(scores.shape[0], 1)], dim=1)
    probs = torch.softmax(scores, dim=1)[:, : e.shape[0]]  # [R, W]
    value = (w * torch.logsumexp(scores, dim=1)).sum()
    grads = [(w[:, None] * probs) @ e, probs.T @ (w[:, None] * q)]
    if bonus is not None:
        grads.append(w[bonus.rows] * probs[bonus.rows, bonus.items])
    return [value, *grads]
