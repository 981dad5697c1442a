"""Dropout drawn per adapter slot, so that a client's masks depend on its own seed alone.

A vectorised pass feeds ``slots * b`` rows, ``b`` per slot in slot order (see
:class:`~fedtreelora.adapters.layer.MultiClientLoraLinear`). Ordinary dropout draws one mask for the
whole batch from the global stream, so a client's masks would depend on which clients share its
pass. Here slot j's rows take their masks from a generator seeded with client j's seed, drawn over
the tokens that client alone would have padded to, so a client trained alone and the same client in
any slot of a pass of k draw the same masks in the same order.

Three dropout sites are covered:

- the LoRA input dropout (:class:`SlotDropout`, built by the LoRA layer);
- the backbone's ``nn.Dropout`` modules (hidden states, pooled output), replaced by
  :class:`SlotDropout` in :func:`use_slot_dropout`;
- attention-probability dropout, which transformers passes as ``dropout=`` to its attention
  function: :func:`use_slot_dropout` switches sdpa models to :func:`slot_sdpa_attention`, which
  computes the probabilities explicitly while training with p > 0, so that their masks can be drawn
  per slot, and otherwise calls the stock sdpa function (evaluation, and causal LMs whose attention
  dropout is 0, keep the fused kernels).

Outside :func:`slot_streams` every piece draws its dropout from the global stream, as before.

Under ``torch.compile`` the mask draws run eagerly (:func:`slot_keep_mask`): one graph break
per dropout site while training with dropout, and the same masks as eager training.

Why masks are drawn per slot over its own span of tokens: batches are padded to their longest row,
and a pass pads every client to the longest row of all of them; a mask drawn over the padded length
would shift with the companions. Each slot therefore draws over the columns its own rows occupy
(what it would have padded to alone) and keeps the padding columns unmasked; padded tokens are
masked out of attention and loss, so what they get does not matter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any, ParamSpec, TypeVar

import torch
from torch import nn
from torch.nn import functional as F

SLOT_ATTENTION = "slot_sdpa"
"""The attention implementation :func:`use_slot_dropout` gives sdpa models. Other implementations
(eager, flash, flex) are left as they are, and their attention dropout, if any, draws from the global
stream; the models this project loads (BERT, LLaMA, Qwen, SmolLM2) default to sdpa."""


class SlotStreams:
    """One random stream per adapter slot, and where each slot's tokens sit in the current batch.

    Args:
        seeds: one seed per active slot (slot j is client j of the pass); a single client is slot 0.
    """

    def __init__(self, seeds: Sequence[int]) -> None:
        if not seeds:
            raise ValueError("slot streams need at least one seed")
        self.seeds = tuple(int(s) for s in seeds)
        self._generators: dict[torch.device, list[torch.Generator]] = {}
        self._spans: list[tuple[int, int]] | None = None
        self._length: int | None = None

    @property
    def num_slots(self) -> int:
        return len(self.seeds)

    def generators(self, device: torch.device) -> list[torch.Generator]:
        """Each slot's generator on ``device`` (CUDA draws need CUDA generators), seeded on first use."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._generators:
            self._generators[device] = [torch.Generator(device=device).manual_seed(s) for s in self.seeds]
        return self._generators[device]

    def set_batch(self, attention_mask: torch.Tensor | None) -> None:
        """Record the columns each slot's rows occupy in the next batch.

        Args:
            attention_mask: (slots * b, T) 1 on tokens, 0 on padding (either side), rows in slot
                order; None when the batch is unpadded (every slot spans all T columns).
        """
        if attention_mask is None:
            self._spans, self._length = None, None
            return
        rows, length = attention_mask.shape
        if rows % self.num_slots:
            raise ValueError(f"batch of {rows} rows cannot be split evenly across {self.num_slots} slots")
        used = attention_mask.detach().reshape(self.num_slots, -1, length).ne(0).any(dim=1).cpu()  # (slots, T)
        spans = []
        for j in range(self.num_slots):
            columns = used[j].nonzero().flatten().tolist()
            spans.append((columns[0], columns[-1] + 1) if columns else (0, length))
        self._spans, self._length = spans, length

    def keep_mask(
        self,
        shape: Sequence[int],
        p: float,
        *,
        token_dims: Sequence[int],
        device: torch.device,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """Which elements of a tensor of ``shape`` dropout keeps (1) or drops (0), slot by slot.

        Args:
            shape: (slots * b, ...) the shape of the tensor to drop out.
            p: drop probability, 0 <= p < 1.
            token_dims: dimensions that run over the batch's tokens (e.g. (1,) for hidden states
                (rows, T, d), (2, 3) for attention probabilities (rows, heads, T, T)); a listed
                dimension whose size is not the batch's token count is treated as any other.
            device, dtype: of the returned tensor.
        Returns:
            (slots * b, ...) 0/1 in ``dtype``; slot j's are drawn from its generator (1 with
            probability 1 - p) over its own span of tokens, and are 1 on the columns outside it.
        """
        rows = shape[0]
        if rows % self.num_slots:
            raise ValueError(f"tensor of {rows} rows cannot be split evenly across {self.num_slots} slots")
        dims = [d for d in token_dims if self._spans is not None and shape[d] == self._length]
        generators = self.generators(device)
        parts = []
        for j in range(self.num_slots):
            start, end = self._spans[j] if dims and self._spans is not None else (0, 0)
            own = [rows // self.num_slots, *shape[1:]]
            for d in dims:
                own[d] = end - start
            keep = torch.empty(own, device=device, dtype=dtype).bernoulli_(1.0 - p, generator=generators[j])
            # dims is empty unless _length is set (an int): the None test changes nothing but the type
            if dims and self._length is not None and end - start != self._length:
                pad: list[int] = [0] * (2 * (len(shape) - min(dims)))
                for d in dims:  # F.pad lists (before, after) pairs from the last dimension backwards
                    at = 2 * (len(shape) - 1 - d)
                    pad[at], pad[at + 1] = start, self._length - end
                keep = F.pad(keep, pad, value=1.0)
            parts.append(keep)
        return parts[0] if len(parts) == 1 else torch.cat(parts)


_ACTIVE: ContextVar[SlotStreams | None] = ContextVar("fedtreelora_slot_streams", default=None)

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _run_eagerly(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """``torch.compiler.disable`` as a typed decorator: torch leaves it unannotated; it returns ``fn``
    wrapped, called the same way."""
    disable: Callable[[Callable[_P, _R]], Callable[_P, _R]] = torch.compiler.disable
    return disable(fn)


@_run_eagerly
def slot_keep_mask(
    shape: Sequence[int], p: float, *, token_dims: Sequence[int], device: torch.device, dtype: torch.dtype
) -> torch.Tensor | None:
    """:meth:`SlotStreams.keep_mask` of the active streams; None outside :func:`slot_streams`.

    Runs eagerly under ``torch.compile``: dynamo traces neither a ContextVar read nor a draw from a
    ``torch.Generator``, so each dropout site splits the compiled graph once, and compiled training
    draws the same masks as eager training.
    """
    streams = _ACTIVE.get()
    if streams is None:
        return None
    return streams.keep_mask(shape, p, token_dims=token_dims, device=device, dtype=dtype)


@contextlib.contextmanager
def slot_streams(seeds: Sequence[int]) -> Iterator[SlotStreams]:
    """Draw every dropout mask inside the block per slot, slot j from ``seeds[j]``.

    Call :meth:`SlotStreams.set_batch` with each batch's attention mask before its forward pass.
    """
    streams = SlotStreams(seeds)
    token = _ACTIVE.set(streams)
    try:
        yield streams
    finally:
        _ACTIVE.reset(token)


class SlotDropout(nn.Dropout):
    """``nn.Dropout`` whose masks come from the active :class:`SlotStreams`, slot by slot.

    Input (slots * b, ...), read as b rows per slot; for 3-d and larger inputs dimension 1 runs
    over tokens, as in hidden states (slots * b, T, d). Outside :func:`slot_streams` it is
    ``nn.Dropout``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = slot_keep_mask(x.shape, self.p, token_dims=(1,) if x.dim() >= 3 else (), device=x.device, dtype=x.dtype)
        if keep is None:
            return F.dropout(x, self.p, True, self.inplace)
        return x * keep * (1.0 / (1.0 - self.p))  # a Python scale: one rounding in bf16, as torch's dropout


def _repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(rows, kv_heads, T, d) -> (rows, kv_heads * groups, T, d) for grouped-query attention."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _attention_with_slot_dropout(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    dropout: float,
    scaling: float | None,
    is_causal: bool | None,
    position_bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention whose probabilities get per-slot dropout inside :func:`slot_streams` (outside,
    ordinary dropout); what sdpa computes, dropout masks aside.

    Args:
        query: (rows, heads, Tq, d); key, value: (rows, kv_heads, Tk, d).
        attention_mask: boolean (True attends) or additive, broadcastable to (rows, heads, Tq, Tk);
            None for none (causal when ``is_causal`` or the module says so, as sdpa reads it).
        position_bias: additive (.., heads, Tq, Tk) scores bias (T5-style models), or None.
    Returns:
        ((rows, Tq, heads, d) output, (rows, heads, Tq, Tk) probabilities after dropout), as
        transformers' attention functions return them.
    """
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_heads(key, groups), _repeat_heads(value, groups)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scale  # (rows, heads, Tq, Tk)
    if position_bias is not None:
        scores = scores + position_bias
    q_len, k_len = scores.shape[-2:]
    if (
        attention_mask is None
        and q_len > 1
        and (getattr(module, "is_causal", True) if is_causal is None else is_causal)
    ):
        attention_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).tril(k_len - q_len)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            # finfo.min rather than -inf: a fully masked (padding) row gets uniform weights, not NaN
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[..., :k_len]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout > 0.0:
        keep = slot_keep_mask(probs.shape, dropout, token_dims=(2, 3), device=probs.device, dtype=probs.dtype)
        probs = F.dropout(probs, dropout, True) if keep is None else probs * keep * (1.0 / (1.0 - dropout))
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def slot_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' sdpa attention, except with dropout (training), where the probabilities are
    computed explicitly so that their masks can be drawn per slot.

    Shapes as :func:`_attention_with_slot_dropout`. Evaluation and p == 0 (causal LMs) keep sdpa's
    fused kernels; so do the few kwargs the explicit path does not reproduce (softcap, sinks).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    unsupported = any(kwargs.get(name) is not None for name in ("softcap", "s_aux", "sinks"))
    if dropout > 0.0 and not unsupported:
        return _attention_with_slot_dropout(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
            position_bias=kwargs.get("position_bias"),
        )  # fmt: skip
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


def _register_slot_attention() -> None:
    """Register ``slot_sdpa`` as an attention implementation, with sdpa's masks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if SLOT_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(SLOT_ATTENTION, slot_sdpa_attention)
        AttentionMaskInterface.register(SLOT_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def use_slot_dropout(model: nn.Module) -> None:
    """Let every dropout of ``model`` draw per slot inside :func:`slot_streams`; idempotent.

    Replaces each ``nn.Dropout`` module by a :class:`SlotDropout` of the same rate and switches a
    transformers model with ``sdpa`` attention to :data:`SLOT_ATTENTION`. Behaviour outside
    :func:`slot_streams` is unchanged.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, SlotDropout(child.p, child.inplace).train(child.training))
    config = getattr(model, "config", None)
    # A transformers model's method; nn.Module's attribute type (Tensor | Module) would not be callable.
    set_attn_implementation = getattr(model, "set_attn_implementation", None)
    if getattr(config, "_attn_implementation", None) == "sdpa" and set_attn_implementation is not None:
        _register_slot_attention()
        set_attn_implementation(SLOT_ATTENTION)
