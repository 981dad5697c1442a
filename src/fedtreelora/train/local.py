"""The local training loop, shared by one client's round and several clients' rounds in one pass.

Clients sit in adapter slots 0..k-1 of a bank; each step collates one batch per client into one
padded batch (rows ``[j*b, (j+1)*b)`` are slot j's), computes each client's loss, and steps AdamW
on their sum, so each slot's gradient is its own client's. With one slot this is exactly one
client's training.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedtreelora.adapters import AdapterBank, PhaseSpec
from fedtreelora.adapters.slot_dropout import slot_streams, use_slot_dropout
from fedtreelora.train.batches import EncodedExamples, batch_indices, collate_clients
from fedtreelora.train.generation import EncodedInstructions
from fedtreelora.train.settings import LocalTraining

SlotLosses = Callable[[nn.Module, dict[str, torch.Tensor], int], torch.Tensor]
"""``(model, batch, k) -> (k,)``: each slot's training loss on its rows of a batch of k clients."""


def make_optimizer(
    bank: AdapterBank, params: list[torch.nn.Parameter], settings: LocalTraining
) -> torch.optim.Optimizer:
    """AdamW over ``params``: the mixer's parameters at ``settings.mixer_lr``, the rest at ``settings.lr``."""
    mixer_ids = {id(p) for p in bank.mixer_parameters()}
    groups = [
        {"params": [p for p in params if id(p) not in mixer_ids], "lr": settings.lr},
        {"params": [p for p in params if id(p) in mixer_ids], "lr": settings.mixer_lr},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=settings.weight_decay)


def train_slots(
    bank: AdapterBank,
    tokenizer: PreTrainedTokenizerBase,
    *,
    phase: PhaseSpec,
    inputs: Sequence[Mapping[str, torch.Tensor]],
    train_data: Sequence[EncodedExamples | EncodedInstructions],
    settings: LocalTraining,
    seeds: Sequence[int],
    device: torch.device,
    slot_losses: SlotLosses,
) -> np.ndarray:
    """Write ``inputs[j]`` (a client's state with the server's payload) into slot j, configure the bank
    for ``phase`` with k = ``len(inputs)`` active slots, and train them together for one round.

    Client j's batch order and its rows' dropout masks come from ``seeds[j]`` alone, so a client trains
    the same whichever clients share its pass; dropout that bypasses the slot streams (functional
    dropout in a model's own code) draws from the global stream seeded with ``seeds[0]``.

    Returns:
        (steps, k) float32: each client's training loss at every step.
    """
    k = len(inputs)
    model = bank.model
    for j in range(k):
        bank.write_slot(j, inputs[j])
    params = bank.configure(phase, active_slots=k)
    optimizer = make_optimizer(bank, params, settings)
    torch.manual_seed(seeds[0])
    use_slot_dropout(model)
    model.train()
    orders = [
        batch_indices(
            len(d), batch_size=settings.batch_size, epochs=settings.local_epochs, steps=settings.local_steps,
            rng=np.random.default_rng(seed),
        )
        for d, seed in zip(train_data, seeds, strict=True)
    ]  # fmt: skip
    losses: list[np.ndarray] = []
    with slot_streams(seeds) as dropout_streams:
        for step in zip(*orders, strict=True):
            batch = collate_clients(tokenizer, list(zip(train_data, step, strict=True)))
            dropout_streams.set_batch(batch.get("attention_mask"))
            batch = {key: v.to(device) for key, v in batch.items()}
            per_client = slot_losses(model, batch, k)
            if not torch.isfinite(per_client).all():
                shown = per_client.item() if k == 1 else per_client.tolist()
                raise FloatingPointError(f"local training loss is {shown} at step {len(losses)}; lower train.lr")
            per_client.sum().backward()  # each slot's gradient is its own client's
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(per_client.detach().float().cpu().numpy())
    optimizer.zero_grad(set_to_none=True)
    return np.stack(losses) if losses else np.zeros((0, k), dtype=np.float32)
