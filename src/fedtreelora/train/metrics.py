"""Evaluation of a personalized model on its own validation split: accuracy for classification,
ROUGE for generation."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedtreelora.train.batches import EncodedExamples, eval_batches
from fedtreelora.train.generation import EncodedInstructions, evaluate_generation
from fedtreelora.train.settings import LocalTraining

PRIMARY_METRIC: dict[str, str] = {"classification": "accuracy", "generation": "rouge1"}
"""Task -> the per-client metric a run records, averages and reports (``final_mean``, ``best_mean``)."""


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device
) -> dict[str, float]:
    """Accuracy and mean cross-entropy over all examples of ``batches``."""
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits
        loss_sum += float(nn.functional.cross_entropy(logits.float(), labels, reduction="sum"))
        correct += int((logits.argmax(dim=-1) == labels).sum())
        total += int(labels.numel())
    if total == 0:
        return {"accuracy": float("nan"), "eval_loss": float("nan")}
    return {"accuracy": correct / total, "eval_loss": loss_sum / total}


def _announcing(
    batches: Iterable[dict[str, torch.Tensor]], before_batch: Callable[[np.ndarray], None]
) -> Iterator[dict[str, torch.Tensor]]:
    """Pass ``batches`` on, calling ``before_batch`` with each batch's example indices first."""
    start = 0
    for batch in batches:
        b = int(batch["labels"].shape[0])
        before_batch(np.arange(start, start + b))
        start += b
        yield batch


def evaluate_client(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    data: EncodedExamples | EncodedInstructions,
    settings: LocalTraining,
    device: torch.device,
    *,
    before_batch: Callable[[np.ndarray], None] | None = None,
) -> dict[str, float]:
    """One client's scores on ``data``: ``accuracy`` and ``eval_loss`` for classification; ``rouge1``,
    ``rougeL``, ``exact_match`` and ``eval_loss`` (response tokens) for instruction data, answers generated
    as ``settings.generation`` says. ``before_batch(indices)`` runs before each batch."""
    if isinstance(data, EncodedInstructions):
        if settings.generation is None:
            raise ValueError("instruction data needs generation settings (LocalTraining.generation)")
        return evaluate_generation(
            model, tokenizer, [data], settings.generation, settings.eval_batch_size, device, before_batch=before_batch
        )[0]
    batches: Iterable[dict[str, torch.Tensor]] = eval_batches(tokenizer, data, settings.eval_batch_size)
    if before_batch is not None:
        batches = _announcing(batches, before_batch)
    return evaluate_classifier(model, batches, device)
