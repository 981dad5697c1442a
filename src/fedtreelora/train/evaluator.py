"""The hook through which a strategy evaluates a client its own way (:attr:`fedtreelora.adapters.PhaseSpec.evaluate`).

The adapters only carry the hook in a phase; it is called by the training code, with the client's data
and settings, so its signature lives here beside those types.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from transformers import PreTrainedTokenizerBase

from fedtreelora.adapters import AdapterBank
from fedtreelora.train.batches import EncodedExamples
from fedtreelora.train.generation import EncodedInstructions
from fedtreelora.train.settings import LocalTraining

__all__ = ["ClientEvaluator"]


class ClientEvaluator(Protocol):
    """A strategy's own evaluation of one client (see :attr:`fedtreelora.adapters.PhaseSpec.evaluate`),
    e.g. FedDPA's instance-wise weighting (:class:`fedtreelora.train.instance_weighting.InstanceWeighting`)."""

    def __call__(
        self,
        bank: AdapterBank,
        tokenizer: PreTrainedTokenizerBase,
        *,
        train_data: EncodedExamples | EncodedInstructions,
        val_data: EncodedExamples | EncodedInstructions,
        settings: LocalTraining,
        device: torch.device,
        seed: int,
    ) -> dict[str, Any]:
        """Score the client in slot 0 of ``bank`` (configured for the phase) on ``val_data``.

        Args:
            train_data: the client's training split (the hook may read it, e.g. as references).
            settings: the client's settings: ``eval_batch_size``, and ``generation`` for instruction data.
            seed: fixes any randomness of the evaluation (sampled answers, reference draws).
        Returns:
            at least ``eval_loss`` and the task's metric (``accuracy``, or ``rouge1`` for generation).
            The bank must be left configured as it was found.
        """
        ...
