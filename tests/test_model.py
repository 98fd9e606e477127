"""Encoder properties: the long-query window mean, padding invariance, causal masking."""

import torch

from mqsa_core.config import ModelConfig
from trainer.data.batches import length_groups
from trainer.model.encoder import MQSAEncoder, PackedLayout, dropout, window_mean


def test_window_mean_matches_brute_force_loop():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 4)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1], [1] * 7], dtype=torch.bool)
    for window in (1, 2, 3, 5):
        layout = PackedLayout.build(mask, torch.arange(3), ((3, 7),), window)
        got = window_mean(x.flatten(0, 1), layout).view(3, 7, 4)
        for b in range(3):
            for t in range(7):
                slots = [s for s in range(max(0, t - window + 1), t + 1) if mask[b, s]]
                want = x[b, slots].mean(0) if slots else torch.zeros(4)
                torch.testing.assert_close(got[b, t], want)


def _encoder(num_blocks: int = 2) -> MQSAEncoder:
    torch.manual_seed(1)
    enc = MQSAEncoder(ModelConfig(dim=8, num_blocks=num_blocks, L=3, dropout=0.5), max_len=10)
    return enc.eval()


def test_more_left_padding_gives_the_same_scores():
    enc = _encoder()
    items = torch.randn(1, 4, 8)
    short = enc(items, torch.ones(1, 4, dtype=torch.bool))
    padded = torch.cat([torch.zeros(1, 5, 8), items], dim=1)
    mask = torch.tensor([[False] * 5 + [True] * 4])
    long = enc(padded, mask)
    torch.testing.assert_close(long[:, 5:], short, rtol=1e-5, atol=1e-6)


def test_future_items_never_change_earlier_positions():
    enc = _encoder()
    items = torch.randn(2, 6, 8)
    mask = torch.ones(2, 6, dtype=torch.bool)
    base = enc(items, mask)
    changed = items.clone()
    changed[:, 4:] = torch.randn(2, 2, 8)
    out = enc(changed, mask)
    torch.testing.assert_close(out[:, :4], base[:, :4])
    assert not torch.allclose(out[:, 4:], base[:, 4:])


def test_last_only_equals_the_last_row_of_the_full_pass():
    enc = _encoder(num_blocks=2)
    items = torch.randn(3, 7, 8)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1], [1] * 7], dtype=torch.bool)
    full = enc(items * mask.unsqueeze(-1), mask)
    last = enc(items * mask.unsqueeze(-1), mask, last_only=True)
    assert last.shape == (3, 1, 8)
    torch.testing.assert_close(last[:, 0], full[:, -1])


def test_length_groups_give_every_real_slot_the_whole_batch_output():
    """The encoder over length groups (what the step and evaluation run) equals one pass over
    the whole batch at every real slot, for any number of groups, and the positions map back."""
    enc = _encoder(num_blocks=2)
    torch.manual_seed(3)
    lengths = torch.tensor([1, 7, 2, 5, 3, 7, 1, 4])
    width = 7
    mask = torch.arange(width).unsqueeze(0) >= (width - lengths).unsqueeze(1)  # right-aligned
    items = torch.randn(8, width, 8) * mask.unsqueeze(-1)
    full = enc(items, mask).flatten(0, 1)
    positions = mask.flatten().nonzero().squeeze(1)  # [P] flat b * T + t
    for groups in (1, 2, 3, 8, 20):
        order = length_groups(mask, groups)
        assert len(order.shapes) == min(groups, 8)
        assert sum(b * t for b, t in order.shapes) < mask.numel() or groups == 1
        slots = torch.arange(items.shape[0] * width).view(-1, width)
        rows = items.flatten(0, 1)
        hidden = enc.forward_groups(rows, slots, mask, order.rows, order.shapes)
        got = hidden.index_select(0, order.positions(positions, width))
        torch.testing.assert_close(got, full.index_select(0, positions), rtol=1e-5, atol=1e-6)
        last = enc.forward_groups(rows, slots, mask, order.rows, order.shapes, last_only=True)
        torch.testing.assert_close(last[order.rows.argsort()], enc(items, mask)[:, -1],
                                   rtol=1e-5, atol=1e-6)  # fmt: skip


def test_dropout_keeps_each_element_with_probability_one_minus_p_and_keeps_the_mean():
    torch.manual_seed(4)
    x = torch.ones(301, 333)  # not a multiple of 4 elements: the last draw is cut
    for p in (0.1, 0.5, 0.9):
        out = dropout(x, p, training=True)
        kept = out != 0
        sigma = (p * (1 - p) / x.numel()) ** 0.5
        assert abs(kept.float().mean().item() - (1 - p)) < 5 * sigma
        rounded = round(p * 65536) / 65536  # the p it draws with
        torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / (1 - rounded)))
        assert abs(out.mean().item() - 1.0) < 5 * sigma / (1 - p)
    assert dropout(x, 0.5, training=False) is x
