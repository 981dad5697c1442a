"""Per-slot dropout: the right rate, slot j's masks from seed j alone, independent of padding."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from fedtreelora.adapters.slot_dropout import (
    SLOT_ATTENTION,
    SlotDropout,
    _attention_with_slot_dropout,
    slot_sdpa_attention,
    slot_streams,
    use_slot_dropout,
)

B, T, D = 3, 10, 16  # rows per slot, tokens, features


def _masks(seeds: list[int], p: float, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """SlotDropout of ``x`` (len(seeds) * B, ...) inside slot streams of ``seeds``."""
    dropout = SlotDropout(p).train()
    with slot_streams(seeds) as streams:
        streams.set_batch(attention_mask)
        return dropout(x)


def test_rate_and_scale() -> None:
    p = 0.3
    out = _masks([1, 2, 3, 4], p, torch.ones(4 * 64, 32, 64))
    kept = out != 0
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / (1 - p)))
    for slot in out.view(4, -1):  # each slot drops at rate p: 131072 draws, 5 standard deviations is 0.006
        assert float((slot == 0).float().mean()) == pytest.approx(p, abs=0.007)


def test_slot_masks_depend_only_on_their_seed() -> None:
    x = torch.ones(3 * B, T, D)
    first = _masks([11, 22, 33], 0.5, x).view(3, B, T, D)
    second = _masks([44, 11, 55], 0.5, x).view(3, B, T, D)
    alone = _masks([11], 0.5, torch.ones(B, T, D))
    assert torch.equal(first[0], alone) and torch.equal(second[1], alone)
    assert not torch.equal(first[1], first[2]) and not torch.equal(first[1], second[0])
    # The same streams keep advancing: a second draw differs from the first.
    dropout = SlotDropout(0.5).train()
    with slot_streams([11]):
        assert not torch.equal(dropout(torch.ones(B, T, D)), dropout(torch.ones(B, T, D)))


@pytest.mark.parametrize("left", [False, True])
def test_masks_cover_each_slots_own_tokens_whatever_the_padding(left: bool) -> None:
    """Slot 1 alone pads to its longest row (6 tokens); in a pass padded to 10 it draws the same masks on
    those 6 columns (at the right end when padding on the left) and keeps every padding column."""
    lengths = [[10, 4, 7], [6, 2, 5], [9, 9, 9]]
    mask = torch.zeros(3 * B, T, dtype=torch.long)
    for row, n in enumerate(n for slot in lengths for n in slot):
        if left:
            mask[row, T - n :] = 1
        else:
            mask[row, :n] = 1
    together = _masks([5, 6, 7], 0.5, torch.ones(3 * B, T, D), mask).view(3, B, T, D)[1]
    own = mask.view(3, B, T)[1][:, 4:] if left else mask.view(3, B, T)[1][:, :6]
    alone = _masks([6], 0.5, torch.ones(B, 6, D), own)
    content, padding = (slice(4, None), slice(0, 4)) if left else (slice(0, 6), slice(6, None))
    assert torch.equal(together[:, content], alone)
    assert torch.equal(together[:, padding], torch.full_like(together[:, padding], 2.0))  # kept, scaled by 1 / (1 - p)


def test_outside_slot_streams_it_is_nn_dropout() -> None:
    x = torch.randn(6, T, D)
    torch.manual_seed(0)
    expected = nn.Dropout(0.2).train()(x)
    torch.manual_seed(0)
    assert torch.equal(SlotDropout(0.2).train()(x), expected)
    assert torch.equal(SlotDropout(0.2).eval()(x), x)


class _Attention(nn.Module):
    def __init__(self, is_causal: bool, groups: int = 1) -> None:
        super().__init__()
        self.is_causal = is_causal
        self.num_key_value_groups = groups


@pytest.mark.parametrize(("is_causal", "groups", "padded"), [(False, 1, True), (True, 2, False), (True, 1, True)])
def test_explicit_attention_is_sdpa_without_dropout(is_causal: bool, groups: int, padded: bool) -> None:
    """The explicit path (used to draw per-slot masks) computes what sdpa does, for padding masks,
    causal attention and grouped-query heads."""
    g = torch.Generator().manual_seed(0)
    heads, rows = 4, 4
    q = torch.randn(rows, heads, T, 8, generator=g)
    k, v = (torch.randn(rows, heads // groups, T, 8, generator=g) for _ in range(2))
    mask = None
    if padded:
        keep = torch.ones(rows, T, dtype=torch.bool)
        keep[1, 6:] = False
        mask = keep[:, None, None, :] & (torch.ones(T, T, dtype=torch.bool).tril() if is_causal else True)
    module = _Attention(is_causal, groups)
    expected, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    got, probs = _attention_with_slot_dropout(
        module, q, k, v, mask, dropout=0.0, scaling=0.3, is_causal=None, position_bias=None
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert probs.shape == (rows, heads, T, T)


def test_attention_dropout_per_slot_and_sdpa_otherwise() -> None:
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2 * B, 2, T, 8, generator=g) for _ in range(3))
    module = _Attention(is_causal=False).train()
    with slot_streams([3, 4]) as streams:
        streams.set_batch(torch.ones(2 * B, T))
        together, probs = slot_sdpa_attention(module, q, k, v, None, dropout=0.5)
    with slot_streams([4]):
        alone, alone_probs = slot_sdpa_attention(module, q[B:], k[B:], v[B:], None, dropout=0.5)
    assert torch.equal(probs[B:], alone_probs)
    torch.testing.assert_close(together[B:], alone)
    assert float((probs == 0).float().mean()) == pytest.approx(0.5, abs=0.05)
    # No dropout, or no slot streams: the stock sdpa function.
    expected, _ = sdpa_attention_forward(module, q, k, v, None)
    got, weights = slot_sdpa_attention(module, q, k, v, None, dropout=0.0)
    assert weights is None and torch.equal(got, expected)


def test_use_slot_dropout_replaces_every_dropout_and_keeps_evaluation(minilm_path: str) -> None:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(minilm_path, num_labels=2, num_hidden_layers=1)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path, config=config).eval()
    ids = torch.randint(1000, 2000, (2, 7))
    attention_mask = torch.ones(2, 7, dtype=torch.long)
    attention_mask[1, 5:] = 0
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=attention_mask).logits
    use_slot_dropout(model)
    use_slot_dropout(model)  # idempotent
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and all(type(m) is SlotDropout for m in dropouts)
    assert model.config._attn_implementation == SLOT_ATTENTION
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=attention_mask).logits, before)
    # Training inside slot streams: one client's rows give the same logits alone and next to another client.
    model.train()
    with slot_streams([8, 9]) as streams:
        pair = torch.cat([ids, ids])
        streams.set_batch(torch.cat([attention_mask, attention_mask]))
        together = model(input_ids=pair, attention_mask=torch.cat([attention_mask, attention_mask])).logits
    with slot_streams([9]) as streams:
        streams.set_batch(attention_mask)
        alone = model(input_ids=ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(together[2:], alone)
    assert not torch.allclose(together[:2], together[2:])  # the other slot drew other masks
