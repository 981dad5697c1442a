"""What adapters a method puts on every target module: its experts, which factors train, how they mix."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fedtreelora.adapters.layer import MIXERS, MixerKind


@dataclass(frozen=True)
class ExpertSpec:
    """One LoRA expert per target module.

    Attributes:
        name: role of the expert, e.g. ``"cluster"``, ``"external"``, ``"shared"``, ``"local"``.
        train_a: whether its A factor receives gradients.
        train_b: whether its B factor receives gradients.
        residual: whether it stays outside the mixer and acts at weight 1 on top of the mixed experts
            (a private adapter beside shared ones). Residual experts come last in a phase.
    """

    name: str
    train_a: bool = True
    train_b: bool = True
    residual: bool = False

    @property
    def trainable(self) -> bool:
        return self.train_a or self.train_b


@dataclass(frozen=True)
class PhaseSpec:
    """How the adapters behave in one phase of a run (e.g. warm-up, federated).

    Attributes:
        experts: the experts, in slot order; the model holds this many per module.
        mixer: how expert outputs combine (see :class:`MultiClientLoraLinear`).
        train_mixer: whether the mixer's own parameters (lambda logit, router) train.
        fixed_weights: weights per expert for the ``fixed`` mixer.
        name: what the phase is called in logs and metrics (``warmup``, ``federated``, ...).
        single_layers: layers (0-based) whose adapters use expert 0 alone at weight 1 whatever ``mixer``
            says, with no mixer parameter trained there (FedTreeLoRA's layers where a client's cluster
            is everyone: no external expert, so lambda would only scale the shared adapter).
        evaluate: None to evaluate the client with the training configuration; else a
            :class:`fedtreelora.train.ClientEvaluator` that evaluates it its own way (e.g. FedDPA's
            instance-wise weighting), called by the training code with the client in slot 0 (its
            signature, which names the training types, lives there). Not part of equality.
    """

    experts: tuple[ExpertSpec, ...]
    mixer: MixerKind = "single"
    train_mixer: bool = False
    fixed_weights: tuple[float, ...] | None = None
    name: str = "federated"
    single_layers: frozenset[int] = frozenset()
    evaluate: Callable[..., dict[str, Any]] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.experts:
            raise ValueError("a phase needs at least one expert")
        if self.mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {MIXERS}, got {self.mixer!r}")
        if self.mixer == "fixed" and (self.fixed_weights is None or len(self.fixed_weights) != len(self.experts)):
            raise ValueError("the fixed mixer needs one fixed weight per expert")
        flags = [e.residual for e in self.experts]
        if any(flags):
            if flags[0] or flags != sorted(flags):
                raise ValueError(
                    f"residual experts must come after every mixed expert and expert 0 must be mixed; got "
                    f"{[(e.name, e.residual) for e in self.experts]}"
                )
            if self.mixer not in ("single", "lambda"):
                raise ValueError(f"residual experts work with the single and lambda mixers, not {self.mixer!r}")

    @property
    def residual_experts(self) -> int:
        """How many trailing experts act at weight 1 outside the mixer."""
        return sum(e.residual for e in self.experts)

    @property
    def expert_names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.experts)

    def mixer_at(self, layer: int) -> MixerKind:
        """The mixer of the adapters in ``layer`` (``single`` in :attr:`single_layers`)."""
        return "single" if layer in self.single_layers else self.mixer
