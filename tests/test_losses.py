"""Paper-mode losses against dense references: full softmax, the chunked log-partition, TED."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.data.teacher import SparseTeacher
from trainer.model.logpartition import weighted_log_partition
from trainer.model.losses import TeacherRows, full_softmax_rec_loss, ted_loss


@pytest.mark.parametrize("zero_column", [False, True])
@pytest.mark.parametrize("sign", [1.0, -1.0])  # -1: every logit negative, the zero column wins
def test_log_partition_value_and_gradients_match_autograd(zero_column, sign):
    torch.manual_seed(0)
    table = (torch.randn(300, 16).abs() * 0.5 * sign).requires_grad_()
    queries = (torch.randn(70, 16).abs() * 3).requires_grad_()
    weights = torch.rand(70)
    anchors = torch.randint(0, 300, (70,))  # any column: the value is read at it
    value = weighted_log_partition(
        queries, table, weights, chunk=32, zero_column=zero_column, anchors=anchors
    )
    value.backward()
    got = queries.grad.clone(), table.grad.clone()
    queries.grad = table.grad = None
    logits = queries @ table.T  # [R, N]
    if zero_column:
        logits = torch.cat([logits, torch.zeros(70, 1)], dim=1)
    want = (torch.logsumexp(logits, dim=1) * weights).sum()
    want.backward()
    torch.testing.assert_close(value, want)
    torch.testing.assert_close(got[0], queries.grad)
    torch.testing.assert_close(got[1], table.grad)


def test_log_partition_is_the_same_at_every_anchor_and_needs_one_without_zero_column():
    torch.manual_seed(2)
    table, queries = torch.randn(200, 8), torch.randn(40, 8) * 2
    weights = torch.rand(40)
    want = (torch.logsumexp(queries @ table.T, dim=1) * weights).sum()
    for anchors in (torch.zeros(40, dtype=torch.int64), (queries @ table.T).argmin(1)):
        got = weighted_log_partition(queries, table, weights, 16, anchors=anchors)
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="needs anchors"):
        weighted_log_partition(queries, table, weights, 16)


def test_log_partition_of_no_rows_is_zero_with_zero_gradients():
    """A rank whose batch has no positions still takes part in the step."""
    table = torch.randn(50, 8, requires_grad=True)
    queries = torch.randn(0, 8, requires_grad=True)
    value = weighted_log_partition(queries, table, torch.ones(0), 16, zero_column=True)
    value.backward()
    assert float(value.detach()) == 0.0 and not table.grad.any() and queries.grad.shape == (0, 8)


def test_full_softmax_loss_equals_cross_entropy_over_table_with_padding_row():
    """The reference scores against the table WITH its zero padding row: N + 1 classes."""
    torch.manual_seed(0)
    items = (torch.randn(50, 8) * 0.1).requires_grad_()
    queries = torch.randn(20, 8).requires_grad_()
    targets = torch.randint(0, 50, (20,))
    got = full_softmax_rec_loss(queries, items[targets], items, norm=20.0, chunk=7, bf16=False)
    with_padding = torch.cat([items, torch.zeros(1, 8)])  # [N + 1, D]
    want = F.cross_entropy(queries @ with_padding.T, targets)
    torch.testing.assert_close(got, want)
    assert abs(float((want - F.cross_entropy(queries @ items.T, targets)).detach())) > 1e-4
    got_grads = torch.autograd.grad(got, [queries, items])
    want_grads = torch.autograd.grad(want, [queries, items])
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w)


def _tiny_graph(num_items: int = 9):
    rng = np.random.default_rng(0)
    dense = np.zeros((num_items, num_items))
    for _ in range(30):
        dense[rng.integers(num_items - 1), rng.integers(num_items)] += 1  # last item: no successors
    src, dst = dense.nonzero()
    return dense, src, dst, dense[src, dst]


def test_sparse_teacher_equals_dense_paper_teacher():
    tau = 0.1
    dense, src, dst, count = _tiny_graph()
    teacher = SparseTeacher.from_edges(src, dst, count, dense.shape[0], tau)
    g = torch.tensor(dense)
    row_max = g.max(dim=1, keepdim=True).values
    want = torch.softmax(g / row_max.clamp(min=1e-12) / tau, dim=1)
    want[row_max.squeeze(1) == 0] = 1.0 / dense.shape[0]  # no successors: uniform
    torch.testing.assert_close(teacher.dense().double(), want, rtol=1e-5, atol=1e-7)


def test_ted_loss_equals_dense_cross_entropy():
    tau = 0.1
    dense, src, dst, count = _tiny_graph()
    n = dense.shape[0]
    teacher = SparseTeacher.from_edges(src, dst, count, n, tau)
    torch.manual_seed(0)
    items = torch.randn(n, 8).requires_grad_()
    heads = torch.tensor([0, 3, 3, 5, 8])
    student = items[heads] * 2.0
    head_index, succ, excess = teacher.rows(heads)
    rows = TeacherRows(teacher.base[heads], head_index, excess, items, succ, heads)
    got = ted_loss(student, items, rows, tau, norm=5.0, chunk=2, bf16=False)
    log_q = torch.log_softmax(student @ items.T / tau, dim=1)
    want = -(teacher.dense()[heads] * log_q).sum(1).mean()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (g_got,) = torch.autograd.grad(got, items, retain_graph=True)
    (g_want,) = torch.autograd.grad(want, items)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-5)
