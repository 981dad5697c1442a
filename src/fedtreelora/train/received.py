"""Scoring the model a client receives: its kept state plus the server's payload, evaluated as the next
round's phase would run it, without training.

This is how the methods' authors score personalized federated LoRA (every round ends with the client
loading what the server sends and evaluating it), so a method is judged by what it gives each client,
not by what two more epochs of local training make of it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from fedtreelora.adapters import AdapterBank, PhaseSpec
from fedtreelora.train.batches import EncodedExamples
from fedtreelora.train.evaluator import ClientEvaluator
from fedtreelora.train.generation import EncodedInstructions
from fedtreelora.train.metrics import evaluate_client
from fedtreelora.train.precision import precision_context
from fedtreelora.train.settings import LocalTraining
from fedtreelora.train.vectorized import evaluate_together


def evaluate_received(
    bank: AdapterBank,
    tokenizer: PreTrainedTokenizerBase,
    *,
    phase: PhaseSpec,
    state: Mapping[str, torch.Tensor],
    payload: Mapping[str, torch.Tensor],
    train_data: EncodedExamples | EncodedInstructions,
    val_data: EncodedExamples | EncodedInstructions,
    settings: LocalTraining,
    seed: int,
    device: torch.device,
) -> dict[str, Any]:
    """One client's scores on its validation split for ``state`` overwritten by ``payload``, in slot 0
    under ``phase`` (a strategy's own evaluation, e.g. FedDPA's instance-wise mixing, when the phase
    has one). Nothing trains and the client's state is not changed.

    Args:
        state: the client's whole adapter state (CPU tensors keyed as :class:`AdapterBank` keys them).
        payload: what the server sends it for the next round (a subset of the keys).
        train_data: its training split (only a strategy's own evaluation reads it).
        seed: fixes any randomness of the evaluation (sampled answers, FedDPA's reference draws).
    Returns:
        the same keys a client round's evaluation gives: ``accuracy`` and ``eval_loss`` for
        classification, ROUGE and ``eval_loss`` for instruction data, plus what a strategy's own
        evaluation adds.
    """
    with precision_context(device, settings.precision):
        bank.write_slot(0, {**state, **payload})
        bank.configure(phase, active_slots=1)
        own: ClientEvaluator | None = phase.evaluate
        if own is not None:
            return own(
                bank, tokenizer, train_data=train_data, val_data=val_data, settings=settings, device=device, seed=seed
            )
        if settings.generation is not None and settings.generation.do_sample:
            torch.manual_seed(seed)
        return evaluate_client(bank.model, tokenizer, val_data, settings, device)


def evaluate_received_together(
    bank: AdapterBank,
    tokenizer: PreTrainedTokenizerBase,
    *,
    phase: PhaseSpec,
    states: Sequence[Mapping[str, torch.Tensor]],
    payloads: Sequence[Mapping[str, torch.Tensor]],
    val_data: Sequence[EncodedExamples | EncodedInstructions],
    settings: LocalTraining,
    seeds: Sequence[int],
    device: torch.device,
) -> list[dict[str, Any]]:
    """:func:`evaluate_received` for ``len(states)`` clients at once, client j in slot j (validation
    sets of equal size; a phase with its own evaluation is not supported here, evaluate those one at a
    time)."""
    if phase.evaluate is not None:
        raise ValueError("a phase with its own evaluation scores one client at a time (evaluate_received)")
    k = len(states)
    if k > bank.num_slots:
        raise ValueError(f"{k} clients do not fit {bank.num_slots} adapter slots")
    with precision_context(device, settings.precision):
        for j in range(k):
            bank.write_slot(j, {**states[j], **payloads[j]})
        bank.configure(phase, active_slots=k)
        if settings.generation is not None and settings.generation.do_sample:
            torch.manual_seed(seeds[0])
        try:
            return evaluate_together(bank, tokenizer, val_data, settings, device)
        finally:
            bank.configure(phase, active_slots=1)
