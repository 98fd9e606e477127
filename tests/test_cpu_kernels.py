"""The hand-written CPU kernel of the paper-mode log-partition (trainer/cpu_kernels.py): the
score product to bf16 rounding (oneDNN's bitwise at Beauty's shapes), torch's softmax to bf16
rounding, an exact transpose, the fused pass equal to the two, and the same log-partition with and
without it.

Built here with this machine's compiler (~30 s once, cached); skipped, with the reason, on a
machine that cannot build it (no AVX-512 BF16, no compiler).
"""

import pytest
import torch

from core.config import load_config
from trainer import cpu_kernels, logpartition
from trainer.builder import load_cpu_kernel
from trainer.distributed import DistEnv
from trainer.logpartition import weighted_log_partition
from trainer.transition_term import ScoreBonus

REASON = cpu_kernels.missing()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"CPU kernel: {REASON}")


@pytest.fixture(scope="module")
def kernel():
    message = cpu_kernels.load()
    assert message == cpu_kernels.LOADED, message
    return cpu_kernels.kernel()


def padded_transpose(rows: int, width: int) -> torch.Tensor:
    """``[width, rows]`` bf16 whose rows are a multiple of 32 apart (as the kernel needs)."""
    stride = cpu_kernels.transpose_stride(rows)
    return torch.full((width, stride), 7.0, dtype=torch.bfloat16)[:, :rows]


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


def test_the_score_product_is_onednns_bitwise_at_beautys_shapes(kernel):
    q_pairs, packed, queries, table = packed_product(96, 12102, 64)
    out = torch.empty(96, 12102, dtype=torch.bfloat16)
    kernel.scores(q_pairs, packed, out)
    assert torch.equal(out, queries @ table.T)


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

    def run() -> list[torch.Tensor]:
        value = weighted_log_partition(
            queries, table, weights, 128, True, zero_column, bonus, anchors
        )  # fmt: skip
        grads = torch.autograd.grad(value, [queries, table, *([bonus_values] if bonus else [])])
        return [value.detach(), *grads]

    logpartition._WORKSPACE.clear()
    with_kernel = run()
    buffers = {name for name, _, _ in logpartition._WORKSPACE}
    assert "probs_t" in buffers  # the kernel ran: the fused pass without a bonus (no scores kept)
    assert ("scores" in buffers) == with_bonus and ("lse" in buffers) != with_bonus
    with cpu_kernels.disabled():
        with_torch = run()
    assert cpu_kernels.kernel() is kernel
    for got, want in zip(with_kernel, with_torch, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-3)
    assert not torch.equal(with_kernel[-1], torch.zeros_like(with_kernel[-1]))


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
    env = DistEnv(rank=0, world=1, local_rank=0, local_world=1, device=torch.device("cpu"))
    load_cpu_kernel(cfg, env)
    assert (cpu_kernels.kernel() is not None) == runs
    assert (cpu_kernels.LOADED in capsys.readouterr().out) == runs
    cpu_kernels.load()  # as the module's other tests expect
