"""One client's round: load its adapters, train locally, evaluate, and cut what it uploads
(:func:`~fedtreelora.train.upload.client_upload`).

The same function serves the in-process engine and a Flower ClientApp.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from fedtreelora.adapters import AdapterBank, PhaseSpec
from fedtreelora.train.batches import EncodedExamples
from fedtreelora.train.evaluator import ClientEvaluator
from fedtreelora.train.generation import EncodedInstructions, response_losses
from fedtreelora.train.local import make_optimizer, train_slots
from fedtreelora.train.metrics import evaluate_client
from fedtreelora.train.precision import precision_context
from fedtreelora.train.settings import LocalTraining
from fedtreelora.train.upload import UploadTransform, client_upload

__all__ = ["ClientResult", "batch_loss", "make_optimizer", "run_client_round"]

Tensors = dict[str, torch.Tensor]


@dataclass
class ClientResult:
    """What a client round produces.

    Attributes:
        state: the client's whole adapter state after training (kept by the client).
        upload: what it sends to the server: the part of ``state`` the strategy asks for, through the
            run's upload transforms (:func:`~fedtreelora.train.upload.client_upload`).
        metrics: train_loss, steps, the evaluation's scores (accuracy, or rouge1/rougeL/exact_match),
            eval_loss, num_train, num_val.
    """

    state: Tensors
    upload: Tensors
    metrics: dict[str, Any]


def batch_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The training loss of one batch: the model's own for classification (labels (b,)); for instruction
    data (labels (b, T)) the mean over response tokens, as a causal LM's own loss, computed without
    logits over the prompts (see :func:`~fedtreelora.train.generation.response_losses`)."""
    if batch["labels"].dim() == 2:
        summed, counted = response_losses(model, batch)
        return summed.sum() / counted.sum().clamp_min(1)
    return model(**batch).loss


def _one_client_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], k: int) -> torch.Tensor:
    """:func:`batch_loss` as the one slot's loss -> (1,)."""
    return batch_loss(model, batch).reshape(1)


def _run_client_round(
    bank: AdapterBank,
    tokenizer: PreTrainedTokenizerBase,
    *,
    phase: PhaseSpec,
    state: Mapping[str, torch.Tensor],
    payload: Mapping[str, torch.Tensor],
    upload_keys: Sequence[str],
    train_data: EncodedExamples | EncodedInstructions,
    val_data: EncodedExamples | EncodedInstructions,
    settings: LocalTraining,
    seed: int,
    device: torch.device,
    client: int | None = None,
    rnd: int | None = None,
    upload_transforms: Sequence[UploadTransform] = (),
) -> ClientResult:
    """Train one client for one round in slot 0 of ``bank`` and evaluate it on its validation split.

    ``seed`` fixes batch order and dropout, so a client's round does not depend on which clients
    ran before it (in-process or on Flower). The upload is ``upload_keys`` of the trained state passed
    through ``upload_transforms``, which see ``client``, ``rnd``, ``seed`` and the received start
    ``{**state, **payload}`` (:func:`~fedtreelora.train.upload.client_upload`).
    """
    start = {**state, **payload}
    (losses,) = train_slots(
        bank, tokenizer, phase=phase, inputs=[start], train_data=[train_data], settings=settings,
        seeds=[seed], device=device, slot_losses=_one_client_loss,
    ).T  # fmt: skip
    own: ClientEvaluator | None = phase.evaluate
    if own is not None:  # the strategy evaluates its own way (e.g. FedDPA's instance-wise mixing)
        evaluation = own(
            bank, tokenizer, train_data=train_data, val_data=val_data, settings=settings, device=device, seed=seed
        )
    else:
        if settings.generation is not None and settings.generation.do_sample:
            torch.manual_seed(seed)  # sampled answers depend on the client's round seed only
        evaluation = evaluate_client(bank.model, tokenizer, val_data, settings, device)
    new_state = bank.read_slot(0)
    upload = client_upload(
        new_state, start, upload_keys, upload_transforms, client=client, rnd=rnd, seed=seed, received=payload
    )
    metrics = {
        # The mean in float64 (a pass of several clients averages in float32, as each always has).
        "train_loss": float(np.mean(losses.astype(np.float64))) if len(losses) else float("nan"),
        "steps": len(losses),
        **evaluation,
        "num_train": len(train_data),
        "num_val": len(val_data),
    }
    return ClientResult(state=new_state, upload=upload, metrics=metrics)


@functools.wraps(_run_client_round)
def run_client_round(bank: AdapterBank, tokenizer: PreTrainedTokenizerBase, **kwargs: Any) -> ClientResult:
    with precision_context(kwargs["device"], kwargs["settings"].precision):
        return _run_client_round(bank, tokenizer, **kwargs)
