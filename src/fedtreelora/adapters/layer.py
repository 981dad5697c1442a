"""A LoRA layer that holds several experts for several clients at once, and mixes the experts.

Every tensor carries a leading *slot* axis: slot k holds one client's adapters. A batch of
``slots * b`` rows is read as ``b`` rows per slot, in slot order, and each slot's rows meet only
that slot's experts and mixer through batched matmuls. The in-process engine can therefore train
one client (one slot) or many clients in one forward/backward with the same layer.
"""

from __future__ import annotations

import math
from typing import Literal, TypedDict

import torch
from torch import nn

from fedtreelora.adapters.slot_dropout import SlotDropout

MixerKind = Literal["single", "lambda", "fixed", "router", "instance", "topm"]
MIXERS: tuple[str, ...] = ("single", "lambda", "fixed", "router", "instance", "topm")


class _Factory(TypedDict):
    """Where and in which dtype the layer's own tensors are made (``torch.zeros(..., **factory)``)."""

    device: torch.device
    dtype: torch.dtype


class MultiClientLoraLinear(nn.Module):
    """``y = W0 x + sum_e w_e(x) * s * B_e A_e x`` for each slot, with ``s = alpha / rank``.

    Mixers (the weights ``w_e``):
      - ``single``: expert 0 alone, weight 1 (plain LoRA; warm-up and FedAvg-style methods).
      - ``lambda``: two experts, ``w = (lambda, 1 - lambda)`` with ``lambda = sigmoid(logit)``, one
        learnable logit per slot (FedTreeLoRA, method.md step 6). With more than two experts every
        expert after the first gets ``1 - lambda`` (the caller scales those experts so that they sum
        to what one external expert would be, e.g. FedTreeLoRA's ``external="per_cluster"``).
      - ``fixed``: constant weights per expert, e.g. FedDPA's fixed mix.
      - ``router``: per-token softmax of a learnable linear map ``d_in -> experts`` (FedALT,
        FedTreeLoRA's router ablation).
      - ``instance``: weights given per input row (instance) from outside through
        :meth:`set_instance_weights` before each forward, e.g. FedDPA's instance-wise weighting at
        inference; nothing trains.
      - ``topm``: FedLEASE's adaptive top-M router over the M experts that exist (``expert_mask``;
        expert 0, the client's own, always exists). A learnable linear map scores every token
        against 2M - 1 outputs: one per existing expert (rows ``[0, experts)`` of ``topm_router``,
        absent experts' rows unused) and M - 1 extra outputs that all stand for expert 0 (rows
        ``experts .. experts + M - 2``). Softmax over those 2M - 1 outputs, keep the M largest,
        renormalise them to sum to 1, and give each expert the sum of its kept outputs. Expert 0
        is therefore always selected (M - 1 non-own outputs cannot fill M places), and a token uses
        between 1 and M distinct experts: that number adapts to the input. Absent experts get
        exactly zero weight.

    Residual experts: the last ``residual_experts`` experts stay outside the mixer and always act at
    weight 1, added to whatever the mixer makes of the others (a private adapter beside mixed shared
    ones, e.g. FedTreeLoRA's ``personal`` option). The mixer then mixes the first
    ``num_experts - residual_experts`` experts only (``lambda`` needs two of them).

    Attributes:
        base: the wrapped, frozen ``nn.Linear`` (d_out x d_in).
        lora_A: one Parameter per expert, (slots, rank, d_in).
        lora_B: one Parameter per expert, (slots, d_out, rank).
        mix_logit: (slots,) the lambda logit of each slot.
        router: (slots, experts, d_in) router weights of each slot.
        topm_router: (slots, 2 * experts - 1, d_in) weights of the ``topm`` mixer of each slot: row
            e < experts scores expert e, rows from ``experts`` on are the extra outputs for expert 0.
        expert_mask: (slots, experts) buffer, 1 where an expert exists for the ``topm`` mixer (the
            column of expert 0 is ignored: it always exists); all ones at construction.
        fixed_weights: (experts,) buffer for the ``fixed`` mixer.
        instance_weights: (slots, b, experts) weights of the ``instance`` mixer for the next forward
            (b rows per slot), or None.
        residual_experts: how many trailing experts act at weight 1 outside the mixer (0: none).
    """

    # Buffers (register_buffer): declared so that they read as tensors, not as Module.__getattr__'s union.
    expert_mask: torch.Tensor
    fixed_weights: torch.Tensor

    def __init__(
        self,
        base: nn.Module,
        *,
        num_slots: int,
        num_experts: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        lambda_init: float = 0.5,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"MultiClientLoraLinear wraps nn.Linear, got {type(base).__name__}")
        if num_slots < 1 or num_experts < 1 or rank < 1:
            raise ValueError(f"num_slots, num_experts and rank must be >= 1, got {num_slots}, {num_experts}, {rank}")
        if not 0.0 < lambda_init < 1.0:
            raise ValueError(f"lambda_init must lie strictly between 0 and 1, got {lambda_init}")
        self.base: nn.Linear = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        d_out, d_in = base.out_features, base.in_features  # 4-bit bitsandbytes weights are packed
        self.rank, self.scaling = rank, alpha / rank
        self.num_slots, self.num_experts = num_slots, num_experts
        factory: _Factory = {"device": base.weight.device, "dtype": torch.float32}
        self.lora_A = nn.ParameterList(
            [nn.Parameter(torch.zeros(num_slots, rank, d_in, **factory)) for _ in range(num_experts)]
        )
        self.lora_B = nn.ParameterList(
            [nn.Parameter(torch.zeros(num_slots, d_out, rank, **factory)) for _ in range(num_experts)]
        )
        logit = math.log(lambda_init / (1.0 - lambda_init))
        self.mix_logit = nn.Parameter(torch.full((num_slots,), logit, **factory))
        self.router = nn.Parameter(torch.zeros(num_slots, num_experts, d_in, **factory))
        self.topm_router = nn.Parameter(torch.zeros(num_slots, 2 * num_experts - 1, d_in, **factory))
        self.register_buffer("expert_mask", torch.ones(num_slots, num_experts, **factory))
        self.register_buffer("fixed_weights", torch.full((num_experts,), 1.0 / num_experts, **factory))
        # Per-slot masks: each client's rows draw from its own seed (fedtreelora.adapters.slot_dropout).
        self.dropout = SlotDropout(dropout) if dropout > 0 else nn.Identity()
        self.mixer: MixerKind = "single"
        self.active_slots = 1
        self.residual_experts = 0
        self.instance_weights: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def mixed_experts(self) -> int:
        """Experts the mixer weighs (the others are residual, at weight 1)."""
        return self.num_experts - self.residual_experts

    def set_mixer(self, mixer: MixerKind, residual_experts: int = 0) -> None:
        """Use ``mixer`` over the first ``num_experts - residual_experts`` experts; the rest act at weight 1."""
        if mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {MIXERS}, got {mixer!r}")
        if not 0 <= residual_experts < self.num_experts:
            raise ValueError(
                f"residual_experts must lie in [0, {self.num_experts - 1}] (expert 0 is always mixed), "
                f"got {residual_experts}"
            )
        if residual_experts and mixer not in ("single", "lambda"):
            raise ValueError(f"residual experts work with the single and lambda mixers, not {mixer!r}")
        if mixer == "lambda" and self.num_experts - residual_experts < 2:
            raise ValueError(
                f"the lambda mixer needs at least 2 mixed experts, this layer has {self.num_experts - residual_experts}"
            )
        self.mixer = mixer
        self.residual_experts = residual_experts

    def set_instance_weights(self, weights: torch.Tensor | None) -> None:
        """Expert weights of every input row for the ``instance`` mixer.

        Args:
            weights: (slots, b, experts): row i of slot k (all its tokens) mixes the experts with
                ``weights[k, i]``; None clears them.
        """
        if weights is not None and (weights.ndim != 3 or weights.shape[-1] != self.num_experts):
            raise ValueError(
                f"instance weights must have shape (slots, rows, {self.num_experts}), got {tuple(weights.shape)}"
            )
        self.instance_weights = weights

    def mixing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Expert weights for each slot's rows.

        Args:
            x: (slots, n, d_in) input rows grouped by slot.
        Returns:
            (slots, n, experts) for the router, topm and instance mixers, else (slots, 1, experts);
            residual experts weigh 1.
        """
        k = x.shape[0]
        if self.mixer == "single":
            w = torch.zeros(self.num_experts, device=x.device, dtype=x.dtype)
            w[0] = 1.0
            w[self.mixed_experts :] = 1.0  # residual experts
            return w.expand(k, 1, -1)
        if self.mixer == "fixed":
            return self.fixed_weights.to(x.dtype).expand(k, 1, -1)
        if self.mixer == "lambda":
            lam = torch.sigmoid(self.mix_logit[:k]).to(x.dtype)[:, None, None]
            rest = (1.0 - lam).expand(-1, -1, self.mixed_experts - 1)
            return torch.cat([lam, rest, torch.ones_like(lam).expand(-1, -1, self.residual_experts)], dim=-1)
        if self.mixer == "instance":
            given = self.instance_weights
            if given is None:
                raise RuntimeError("the instance mixer needs set_instance_weights(...) before the forward pass")
            if given.shape[0] != k or x.shape[1] % given.shape[1]:
                raise ValueError(
                    f"instance weights for {given.shape[0]} slots x {given.shape[1]} rows do not fit {k} slots x "
                    f"{x.shape[1]} tokens"
                )
            return given.to(x.device, x.dtype).repeat_interleave(x.shape[1] // given.shape[1], dim=1)
        if self.mixer == "topm":
            return self.topm_weights(x)
        logits = torch.bmm(x, self.router[:k].to(x.dtype).transpose(1, 2))  # (slots, n, experts)
        return torch.softmax(logits, dim=-1)

    def topm_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Expert weights of the ``topm`` mixer (FedLEASE's adaptive top-M router).

        Args:
            x: (slots, n, d_in) input rows grouped by slot (before dropout).
        Returns:
            (slots, n, experts): per token, nonnegative weights summing to 1, zero for absent experts.
        """
        k, e = x.shape[0], self.num_experts
        present = self.expert_mask[:k] > 0  # (slots, experts)
        present = torch.cat([torch.ones_like(present[:, :1]), present[:, 1:]], dim=1)  # the own expert is always there
        m = present.sum(dim=1)  # (slots,) M, the number of existing experts
        extra = torch.arange(e - 1, device=x.device) < (m - 1)[:, None]  # (slots, experts - 1): M - 1 extra outputs
        active = torch.cat([present, extra], dim=1)  # (slots, 2 * experts - 1), 2M - 1 true per slot
        logits = torch.bmm(x, self.topm_router[:k].to(x.dtype).transpose(1, 2)).float()  # (slots, n, 2E - 1)
        # Softmax in float32 as the authors do; -inf keeps unused outputs at exactly zero probability.
        probs = torch.softmax(logits.masked_fill(~active[:, None, :], float("-inf")), dim=-1)
        # topk over E >= M outputs then keep each slot's first M, so slots with different M need no host sync.
        _, idx = probs.topk(e, dim=-1)  # (slots, n, experts), largest first
        keep = (torch.arange(e, device=x.device) < m[:, None, None]).to(probs.dtype).expand_as(idx)
        chosen = probs * torch.zeros_like(probs).scatter(-1, idx, keep)
        chosen = chosen / chosen.sum(dim=-1, keepdim=True)
        own = chosen[..., :1] + chosen[..., e:].sum(dim=-1, keepdim=True)  # extra outputs all count for expert 0
        return torch.cat([own, chosen[..., 1:e]], dim=-1).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (slots * b, ..., d_in). Returns: (slots * b, ..., d_out)."""
        out: torch.Tensor = self.base(x)
        k = self.active_slots
        if x.shape[0] % k:
            raise ValueError(f"batch of {x.shape[0]} rows cannot be split evenly across {k} active client slots")
        rows = self.dropout(x).reshape(k, -1, x.shape[-1])
        clean = x.reshape(k, -1, x.shape[-1])
        weights = self.mixing_weights(clean)
        delta = torch.zeros(k, rows.shape[1], self.out_features, device=x.device, dtype=x.dtype)
        mixed = [0] if self.mixer == "single" else list(range(self.mixed_experts))
        experts = mixed + list(range(self.mixed_experts, self.num_experts))
        for e in experts:
            a = self.lora_A[e][:k].to(x.dtype)
            b = self.lora_B[e][:k].to(x.dtype)
            delta = delta + weights[..., e : e + 1] * torch.bmm(torch.bmm(rows, a.transpose(1, 2)), b.transpose(1, 2))
        return out + self.scaling * delta.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling:g}, "
            f"slots={self.num_slots}, experts={self.num_experts}, mixer={self.mixer}, "
            f"residual={self.residual_experts}"
        )
