"""The hand-written CPU kernel of the paper-mode softmax (trainer/cpu_kernels.py): torch's
softmax to bf16 rounding, an exact transpose, and the same log-partition with and without it.

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
    with pytest.raises(RuntimeError, match="bfloat16 tensors only"):
        kernel.softmax_rows_and_transpose(scores.float(), probs, padded_transpose(40, 300))


@pytest.mark.parametrize("zero_column", [True, False])
def test_the_log_partition_is_the_same_with_and_without_the_kernel(kernel, zero_column):
    """Value and both gradients (and a score bonus's) in bf16: torch's softmax path against the
    kernel's, on more rows than one chunk (the transpose buffer is reused across chunks)."""
    torch.manual_seed(3)
    table = (torch.randn(2000, 32) * 0.3).requires_grad_()
    queries = (torch.randn(300, 32) * 2).requires_grad_()
    weights = torch.rand(300)
    anchors = None if zero_column else torch.randint(0, 2000, (300,))
    bonus_values = torch.rand(500, requires_grad=True)
    pairs = torch.randperm(300 * 2000)[:500]  # distinct (row, item) pairs
    bonus = ScoreBonus(rows=pairs // 2000, items=pairs % 2000, values=bonus_values)

    def run() -> list[torch.Tensor]:
        value = weighted_log_partition(
            queries, table, weights, 128, True, zero_column, bonus, anchors
        )  # fmt: skip
        grads = torch.autograd.grad(value, [queries, table, bonus_values])
        return [value.detach(), *grads]

    logpartition._WORKSPACE.clear()
    with_kernel = run()
    assert any(name == "probs_t" for name, _, _ in logpartition._WORKSPACE)  # the kernel ran
    with cpu_kernels.disabled():
        with_torch = run()
    assert cpu_kernels.kernel() is kernel
    for got, want in zip(with_kernel, with_torch, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-3)
    assert not torch.equal(with_kernel[2], torch.zeros_like(with_kernel[2]))


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
