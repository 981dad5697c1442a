"""One client's round: load its adapters, train locally, evaluate, and pick what it uploads.

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
from fedtreelora.adapters.slot_dropout import slot_streams, use_slot_dropout
from fedtreelora.train.batches import EncodedExamples, train_batches
from fedtreelora.train.generation import EncodedInstructions, response_losses
from fedtreelora.train.metrics import evaluate_client
from fedtreelora.train.precision import precision_context
from fedtreelora.train.settings import LocalTraining

Tensors = dict[str, torch.Tensor]


@dataclass
class ClientResult:
    """What a client round produces.

    Attributes:
        state: the client's whole adapter state after training (kept by the client).
        upload: the part of ``state`` it sends to the server.
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


def make_optimizer(
    bank: AdapterBank, params: list[torch.nn.Parameter], settings: LocalTraining
) -> torch.optim.Optimizer:
    mixer_ids = {id(p) for p in bank.mixer_parameters()}
    groups = [
        {"params": [p for p in params if id(p) not in mixer_ids], "lr": settings.lr},
        {"params": [p for p in params if id(p) in mixer_ids], "lr": settings.mixer_lr},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=settings.weight_decay)


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
) -> ClientResult:
    """Train one client for one round in slot 0 of ``bank`` and evaluate it on its validation split.

    ``seed`` fixes batch order and dropout, so a client's round does not depend on which clients
    ran before it (in-process or on Flower).
    """
    model = bank.model
    merged = {**state, **payload}
    bank.write_slot(0, merged)
    params = bank.configure(phase, active_slots=1)
    optimizer = make_optimizer(bank, params, settings)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)  # dropout that bypasses the slot streams (functional dropout in a model's own code)
    use_slot_dropout(model)
    model.train()
    losses: list[float] = []
    # Dropout masks come from the client's seed as slot 0, the same masks it draws in any slot of a vectorised pass.
    with slot_streams([seed]) as streams:
        for batch in train_batches(
            tokenizer,
            train_data,
            batch_size=settings.batch_size,
            epochs=settings.local_epochs,
            steps=settings.local_steps,
            rng=rng,
        ):
            streams.set_batch(batch.get("attention_mask"))
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = batch_loss(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"local training loss is {loss.item()} at step {len(losses)}; lower train.lr")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    optimizer.zero_grad(set_to_none=True)
    if phase.evaluate is not None:  # the strategy evaluates its own way (e.g. FedDPA's instance-wise mixing)
        evaluation = phase.evaluate(
            bank, tokenizer, train_data=train_data, val_data=val_data, settings=settings, device=device, seed=seed
        )
    else:
        if settings.generation is not None and settings.generation.do_sample:
            torch.manual_seed(seed)  # sampled answers depend on the client's round seed only
        evaluation = evaluate_client(model, tokenizer, val_data, settings, device)
    new_state = bank.read_slot(0)
    upload = {k: new_state[k] for k in upload_keys}
    metrics = {
        "train_loss": float(np.mean(losses)) if losses else float("nan"),
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
