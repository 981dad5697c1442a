"""What a client's round is told about optimisation and evaluation: plain frozen records derived from the
configuration (:class:`~fedtreelora.config.TrainConfig`, :class:`~fedtreelora.config.GenerationConfig`), so
training code depends on these and not on the configuration schema."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from fedtreelora.config import ExperimentConfig


@dataclass(frozen=True)
class GenerationSettings:
    """How answers are generated at evaluation (a view of the ``generation`` config section)."""

    max_new_tokens: int = 32
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass(frozen=True)
class LocalTraining:
    """Local optimisation and evaluation settings of a client (a view of ``TrainConfig``; built by
    :func:`local_training`, which copies every field but ``precision`` and ``generation`` by name)."""

    batch_size: int
    eval_batch_size: int
    local_epochs: int
    local_steps: int | None
    lr: float
    mixer_lr: float
    weight_decay: float
    precision: Literal["fp32", "bf16"]
    """``train.precision`` resolved for the device (``auto``: fp32 on CPU, bf16 on a GPU)."""
    generation: GenerationSettings | None = None
    """How a causal LM's answers are generated at evaluation; None for classification."""


def local_training(config: ExperimentConfig, device_type: str) -> LocalTraining:
    """The settings every client of ``config`` trains and evaluates with on a ``device_type`` device
    (``"cpu"``, ``"cuda"``, ...)."""
    train = config.train
    copied = {
        f.name: getattr(train, f.name) for f in fields(LocalTraining) if f.name not in ("precision", "generation")
    }
    precision = ("fp32" if device_type == "cpu" else "bf16") if train.precision == "auto" else train.precision
    generation = None
    if config.data.resolved_task() == "generation":
        generation = GenerationSettings(
            **{f.name: getattr(config.generation, f.name) for f in fields(GenerationSettings)}
        )
    return LocalTraining(**copied, precision=precision, generation=generation)
