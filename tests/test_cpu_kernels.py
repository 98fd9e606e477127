"""The hand-written CPU kernel of the paper-mode log-partition (trainer/model/cpu_kernels.py): the
score product to bf16 rounding, torch's softmax to bf16 rounding, an exact transpose whose
padding is zeros, the fused pass equal to the two, and the same log-partition with and without
it, also for a product that reads the transpose's padding (as oneDNN's AMX kernels do).

Built here with this machine's compiler (~30 s once, cached); skipped, with the reason, on a
machine that cannot build it (no AVX-512 BF16, no compiler). The selection branches and the
self-check's fallback are in tests/test_kernel_selection.py.
"""

from itertools import islice

import pytest
import torch

from mqsa_core.config import load_config
from tests.synthetic import write_prepared
from trainer.data.prefetch import prefetched
from trainer.model import cpu_kernels, logpartition
from trainer.model.logpartition import weighted_log_partition
from trainer.model.transition_term import ScoreBonus
from trainer.runtime.builder import build_components, load_cpu_kernel
from trainer.runtime.distributed import DistEnv
from trainer.runtime.engine import DivergenceGuard, build_optimizer

REASON = cpu_kernels.missing()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"CPU kernel: {REASON}")
HOST = DistEnv(rank=0, world=1, local_rank=0, local_world=1, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def kernel() -> cpu_kernels.CpuKernel:
    kernel, message = cpu_kernels.select()
    assert kernel is not None, message
    return kernel


def padded_transpose(rows: int, width: int) -> torch.Tensor:
    """``[width, rows]`` bf16 whose rows are a multiple of 32 apart (as the kernel needs), NaN
    everywhere as a reused buffer may be."""
    stride = cpu_kernels.transpose_stride(rows)
    return torch.full((width, stride), float("nan"), dtype=torch.bfloat16)[:, :rows]


def padding(probs_t: torch.Tensor) -> torch.Tensor:
    """The columns of a transpose buffer past its rows, up to its stride."""
    full = probs_t.as_strided((probs_t.shape[0], probs_t.stride(0)), (probs_t.stride(0), 1))
    return full[:, probs_t.shape[1] :]


@pytest.mark.parametrize(
    "rows,width", [(1, 1), (3, 5), (31, 17), (32, 16), (33, 100), (70, 1003), (64, 12102)]
)
def test_the_kernel_is_torch_softmax_and_its_exact_transpose(kernel, rows, width):
    torch.manual_seed(rows * 7 + width)
    scores = (torch.randn(rows, width) * 6).to(torch.bfloat16)
    probs = torch.empty_like(scores)
    probs_t = padded_transpose(rows, width)
    kernel.softmax_rows_and_transpose(scores, probs, probs_t)
    want = torch.softmax(scores.double(), dim=1)
    # bf16 rounding of the exact softmax (2^-8 relative), plus the float32 work inside
    torch.testing.assert_close(probs.double(), want, rtol=2**-7, atol=1e-30)
    assert torch.equal(probs_t, probs.T)
    assert padding(probs_t).eq(0).all()


def test_a_nan_score_makes_its_row_nan_and_no_other(kernel):
    scores = torch.randn(40, 300).to(torch.bfloat16)
    scores[5, 123] = float("nan")
    probs, probs_t = torch.empty_like(scores), padded_transpose(40, 300)
    kernel.softmax_rows_and_transpose(scores, probs, probs_t)
    assert probs[5].isnan().all()
    assert not probs[torch.arange(40) != 5].isnan().any()


def test_the_kernel_refuses_a_transpose_it_cannot_write_in_whole_lines(kernel):
    scores = torch.randn(40, 300).to(torch.bfloat16)
    probs = torch.empty_like(scores)
    with pytest.raises(RuntimeError, match="probs_t must start on 64 bytes"):
        kernel.softmax_rows_and_transpose(scores, probs, torch.empty(300, 40, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="scores: a bfloat16 CPU tensor"):
        kernel.softmax_rows_and_transpose(scores.float(), probs, padded_transpose(40, 300))


def packed_product(rows: int, width: int, dim: int) -> tuple[torch.Tensor, ...]:
    """``(queries [R, D'], packed table, table [W, D])`` bf16, as logpartition hands them over."""
    torch.manual_seed(rows * 131 + width * 7 + dim)
    queries = torch.randn(rows, dim).to(torch.bfloat16)
    table = (torch.randn(width, dim) * 0.5).to(torch.bfloat16)
    return cpu_kernels.pairs(queries), cpu_kernels.pack_items(table), queries, table


@pytest.mark.parametrize(
    "rows,width,dim",
    [(1, 1, 2), (7, 5, 3), (8, 16, 64), (9, 17, 64), (33, 48, 64), (70, 1003, 31), (19, 49, 8)],
)
def test_the_score_product_is_the_bf16_product(kernel, rows, width, dim):
    q_pairs, packed, queries, table = packed_product(rows, width, dim)
    out = torch.full((rows, width), 7.0, dtype=torch.bfloat16)
    kernel.scores(q_pairs, packed, out)
    exact = queries.double() @ table.double().T
    # one bf16 rounding of a float32 sum (2^-8 relative), and float32's rounding on the way
    torch.testing.assert_close(out.double(), exact, rtol=2**-7, atol=1e-5)


def test_the_score_product_is_within_a_bf16_rounding_at_beautys_shapes(kernel):
    q_pairs, packed, queries, table = packed_product(96, 12102, 64)
    out = torch.empty(96, 12102, dtype=torch.bfloat16)
    kernel.scores(q_pairs, packed, out)
    exact = queries.double() @ table.double().T
    bound = queries.double().abs() @ table.double().abs().T
    assert ((out.double() - exact).abs() <= 2**-7 * exact.abs() + 1e-5 * bound).all()


def fused_pass(kernel, q_pairs, packed, table, rows, width):
    """``(probs_t, lse, expected [R, D])`` from the kernel's one pass (``expected = p . E``)."""
    paired = cpu_kernels.pair_items(table)
    probs_t, lse = padded_transpose(rows, width), torch.full((rows,), 7.0)
    expected = torch.full((rows, paired.shape[1]), 7.0)
    kernel.log_partition_block(q_pairs, packed, paired, probs_t, lse, expected)
    return probs_t, lse, expected[:, : table.shape[1]]


@pytest.mark.parametrize(
    "rows,width,dim", [(1, 1, 2), (37, 1003, 64), (64, 12102, 64), (5, 33, 7), (41, 77, 48)]
)
def test_the_fused_pass_is_the_product_then_the_softmax(kernel, rows, width, dim):
    q_pairs, packed, _, table = packed_product(rows, width, dim)
    probs_t, lse, expected = fused_pass(kernel, q_pairs, packed, table, rows, width)
    scores = torch.empty(rows, width, dtype=torch.bfloat16)
    kernel.scores(q_pairs, packed, scores)
    probs, want_t = torch.empty_like(scores), padded_transpose(rows, width)
    kernel.softmax_rows_and_transpose(scores, probs, want_t)
    assert torch.equal(probs_t, want_t)  # the same softmax, bitwise
    assert padding(probs_t).eq(0).all()
    torch.testing.assert_close(
        lse.double(), torch.logsumexp(scores.double(), dim=1), rtol=1e-6, atol=1e-5
    )
    # float32 sums of the bf16 products (oneDNN rounds the same sums to bf16)
    torch.testing.assert_close(
        expected.double(), probs.double() @ table.double(), rtol=1e-5, atol=1e-5
    )


def test_a_nan_query_makes_its_row_nan_in_the_fused_pass(kernel):
    q_pairs, packed, _, table = packed_product(40, 300, 64)
    q_pairs[5, 17] = float("nan")
    probs_t, lse, expected = fused_pass(kernel, q_pairs, packed, table, 40, 300)
    assert probs_t[:, 5].isnan().all() and lse[5].isnan() and expected[5].isnan().all()
    others = torch.arange(40) != 5
    assert not probs_t[:, others].isnan().any() and not lse[others].isnan().any()
    assert not expected[others].isnan().any()


def test_the_product_refuses_a_table_not_packed_for_it(kernel):
    q_pairs, packed, _, table = packed_product(8, 40, 64)
    out = torch.empty(8, 40, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="the packed table"):
        kernel.scores(q_pairs, table, out)
    with pytest.raises(RuntimeError, match="the packed table"):
        kernel.scores(q_pairs, packed[:2], out)  # 32 items for 40 columns
    with pytest.raises(RuntimeError, match="D even"):
        kernel.scores(q_pairs[:, :63], packed, out)
    probs_t, lse, expected = padded_transpose(8, 40), torch.empty(8), torch.empty(8, 64)
    with pytest.raises(RuntimeError, match="paired by items"):
        kernel.log_partition_block(q_pairs, packed, packed, probs_t, lse, expected)


@pytest.mark.parametrize("with_bonus", [True, False])
@pytest.mark.parametrize("zero_column", [True, False])
def test_the_log_partition_is_the_same_with_and_without_the_kernel(kernel, zero_column, with_bonus):
    """Value and both gradients (and a score bonus's) in bf16: torch's path against the kernel's
    (the product, then the bonus and the softmax; or without a bonus the fused pass), on more rows
    than one chunk (the buffers are reused across chunks)."""
    torch.manual_seed(3)
    table = (torch.randn(2000, 32) * 0.3).requires_grad_()
    queries = (torch.randn(300, 32) * 2).requires_grad_()
    weights = torch.rand(300)
    anchors = None if zero_column else torch.randint(0, 2000, (300,))
    bonus_values = torch.rand(500, requires_grad=True)
    pairs = torch.randperm(300 * 2000)[:500]  # distinct (row, item) pairs
    bonus = (
        ScoreBonus(rows=pairs // 2000, items=pairs % 2000, values=bonus_values)
        if with_bonus
        else None
    )

    def run(on: cpu_kernels.CpuKernel | None) -> list[torch.Tensor]:
        value = weighted_log_partition(
            queries, table, weights, 128, True, zero_column, bonus, anchors, on
        )  # fmt: skip
        grads = torch.autograd.grad(value, [queries, table, *([bonus_values] if bonus else [])])
        return [value.detach(), *grads]

    logpartition.reset_workspace()
    with_kernel = run(kernel)
    buffers = {name for name, _, _ in logpartition._WORKSPACE}
    assert "probs_t" in buffers  # the kernel ran: the fused pass without a bonus (no scores kept)
    assert ("scores" in buffers) == with_bonus and ("lse" in buffers) != with_bonus
    with_torch = run(None)
    for got, want in zip(with_kernel, with_torch, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-3)
    assert not torch.equal(with_kernel[-1], torch.zeros_like(with_kernel[-1]))


@pytest.mark.parametrize("with_bonus", [True, False])
def test_a_product_reading_the_transposes_padding_stays_finite(kernel, with_bonus):
    """The Intel Xeon failure: oneDNN's AMX matmul reads ``softmax^T``'s last K tile whole, up to
    its row stride, and relies on the other operand's zero padding. Here that read is done by
    hand over buffers first filled with NaN (what a reused buffer may hold): the kernel leaves
    zeros there, so the table's gradient stays finite (it was NaN before the fix)."""
    torch.manual_seed(11)
    rows, width = 45, 501  # a partial block of 13 rows; the reproduction's 500 items + padding
    table = (torch.randn(width, 64) * 0.3).to(torch.bfloat16)
    queries = (torch.randn(rows, 64) * 2).to(torch.bfloat16)
    probs_t = padded_transpose(rows, width)
    stride = probs_t.stride(0)
    if with_bonus:
        scores = torch.empty(rows, width, dtype=torch.bfloat16)
        kernel.scores(cpu_kernels.pairs(queries), cpu_kernels.pack_items(table), scores)
        kernel.softmax_rows_and_transpose(scores, torch.empty_like(scores), probs_t)
    else:
        paired = cpu_kernels.pair_items(table)
        lse, expected = torch.empty(rows), torch.empty(rows, paired.shape[1])
        q_pairs, packed = cpu_kernels.pairs(queries), cpu_kernels.pack_items(table)
        kernel.log_partition_block(q_pairs, packed, paired, probs_t, lse, expected)
    whole_tiles = probs_t.as_strided((width, stride), (stride, 1))  # K read up to the stride
    right = torch.zeros(stride, 64, dtype=torch.bfloat16)
    right[:rows] = queries  # the other operand, zero-padded as oneDNN packs it
    grad_table = whole_tiles.float() @ right.float()
    assert torch.isfinite(grad_table).all()
    torch.testing.assert_close(grad_table, probs_t.float() @ queries.float())


class NaNInTheTranspose(cpu_kernels.CpuKernel):
    """The real kernel, but one entry of its softmax transpose is NaN: only the table's gradient
    reads it."""

    def log_partition_block(self, q, items, paired, probs_t, lse, expected) -> None:
        super().log_partition_block(q, items, paired, probs_t, lse, expected)
        probs_t[0, 0] = float("nan")


def test_a_non_finite_gradient_makes_the_value_nan(kernel):
    """A NaN that reaches a gradient (never the value) spoils the value, so the step's guard
    skips the step before a weight changes."""
    torch.manual_seed(5)
    table = (torch.randn(300, 16) * 0.3).requires_grad_()
    queries = torch.randn(40, 16).requires_grad_()
    weights = torch.ones(40)
    good = weighted_log_partition(queries, table, weights, 64, True, True, None, None, kernel)
    assert torch.isfinite(good)
    spoiled = NaNInTheTranspose(kernel.module)
    value = weighted_log_partition(queries, table, weights, 64, True, True, None, None, spoiled)
    assert value.isnan()


@pytest.mark.parametrize(
    "overrides,runs",
    [
        ([], True),  # paper mode, bf16, on CPU: the kernel
        (["train.cpu_kernel=false"], False),
        (["train.bf16=false"], False),
        (["loss.candidates=sampled"], False),  # catalogue mode has no catalogue-wide softmax
    ],
)
def test_a_run_loads_the_kernel_where_it_applies_and_says_so(kernel, capsys, overrides, runs):
    cfg = load_config(None, ["train.bf16=true", *overrides])
    assert (load_cpu_kernel(cfg, HOST) is not None) == runs
    assert (cpu_kernels.LOADED in capsys.readouterr().out) == runs


@pytest.mark.parametrize("term", [False, True])
def test_the_reproductions_first_steps_leave_no_stale_buffer_for_a_product(kernel, tmp_path, term):
    """The reproduction's setting (the demo template, 500 items, the transition term off: the one
    pass; on: the product, then the softmax) for a few steps, every scratch buffer filled with NaN
    before each step as stale memory may be: every step is finite, and each call's transpose
    block is written whole, padding columns included, so no product can read a stale value (on
    an Intel Xeon with AMX it did, and the main job stopped in epoch 1)."""
    data = write_prepared(tmp_path / "data", num_users=200, num_items=500, max_len=50)
    cfg = load_config("configs/demo.yaml", [
        f"data.dir={data}", "data.max_len=50", "embeddings.backend=dense", "train.bf16=true",
        f"model.transition_term={term}", "train.cpu_kernel=true", "train.batch_size=64",
    ])  # fmt: skip
    run = build_components(cfg, HOST)
    assert run.objective.kernel is not None
    optimizer = build_optimizer(run.objective, cfg.train, cfg.model.l2, HOST.device)
    guard = DivergenceGuard(optimizer, HOST.device)
    items = ((train, 1, step) for step, train in enumerate(run.users.train_batches(epoch=1)))
    batches = prefetched(items, lambda item: run.batches(*item), HOST.device)
    for step, batch in enumerate(islice(batches, 3)):
        logpartition.fill_workspace(float("nan"))
        losses = run.objective(batch)
        guard.observe(losses.total, step)
        losses.total.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert torch.isfinite(losses.total), step
        flat = logpartition._WORKSPACE[("probs_t", torch.bfloat16, HOST.device)]
        written = int(flat.isnan().nonzero()[0]) if flat.isnan().any() else flat.numel()
        # the recommendation loss's [501, stride] block (500 items and the zero column), then
        # the TED loss's [500, stride] one: both written whole from the start of the buffer
        assert written >= 501 * cpu_kernels.transpose_stride(int(batch.positions.shape[0]))
    assert guard.skipped() == 0
