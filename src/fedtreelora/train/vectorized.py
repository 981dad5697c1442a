"""Several clients' rounds in one pass: each client sits in its own adapter slot, their rows share
one forward/backward, and each row meets only its own client's experts.

Because the clients' losses add and AdamW is elementwise, this is the same computation as training
them one after another (:func:`fedtreelora.train.run_client_round`), up to float rounding: each
client's rows draw their dropout masks from its own seed (:mod:`fedtreelora.adapters.slot_dropout`),
so a client gets the same masks whichever clients share its pass.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedtreelora.adapters import AdapterBank, PhaseSpec
from fedtreelora.train.batches import EncodedExamples, collate_clients
from fedtreelora.train.client import ClientResult
from fedtreelora.train.generation import EncodedInstructions, evaluate_generation, response_losses
from fedtreelora.train.local import train_slots
from fedtreelora.train.precision import precision_context
from fedtreelora.train.settings import LocalTraining
from fedtreelora.train.upload import UploadTransform, client_upload


def _per_client_loss(model: nn.Module, batch: dict[str, torch.Tensor], k: int) -> torch.Tensor:
    """Each client's training loss on its rows of ``batch``, as one client alone would compute it -> (k,).

    Classification: labels (k*b,), mean cross-entropy of the client's rows.
    Generation: labels (k*b, T), next-token cross-entropy averaged over the client's scored (response)
    tokens, as a causal LM's own loss averages over its batch.
    """
    labels = batch["labels"]
    if labels.dim() == 2:
        summed, counted = response_losses(model, batch)
        return summed.view(k, -1).sum(dim=1) / counted.view(k, -1).sum(dim=1).clamp_min(1)
    inputs = {key: v for key, v in batch.items() if key != "labels"}
    losses = nn.functional.cross_entropy(model(**inputs).logits.float(), labels, reduction="none")
    return losses.view(k, -1).mean(dim=1)


@torch.no_grad()
def evaluate_together(
    bank: AdapterBank,
    tokenizer: PreTrainedTokenizerBase,
    val_data: Sequence[EncodedExamples | EncodedInstructions],
    settings: LocalTraining,
    device: torch.device,
) -> list[dict[str, float]]:
    """Each client's scores; validation sets of equal size, ``settings.eval_batch_size`` rows each per step.

    Classification: accuracy and mean cross-entropy. Instruction data: every client's answers are
    generated in one left-padded batch (each row through its own client's adapters), then scored.
    """
    batch_size = settings.eval_batch_size
    instructions = [d for d in val_data if isinstance(d, EncodedInstructions)]
    if len(instructions) == len(val_data):
        if settings.generation is None:
            raise ValueError("instruction data needs generation settings (LocalTraining.generation)")
        return evaluate_generation(bank.model, tokenizer, instructions, settings.generation, batch_size, device)
    k = len(val_data)
    n = len(val_data[0])
    model = bank.model
    model.eval()
    correct, loss_sum = np.zeros(k), np.zeros(k)
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        batch = {key: v.to(device) for key, v in collate_clients(tokenizer, [(d, idx) for d in val_data]).items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits
        losses = nn.functional.cross_entropy(logits.float(), labels, reduction="none").view(k, -1)
        loss_sum += losses.sum(dim=1).cpu().numpy()
        correct += (logits.argmax(dim=-1) == labels).view(k, -1).sum(dim=1).cpu().numpy()
    if n == 0:
        return [{"accuracy": float("nan"), "eval_loss": float("nan")} for _ in range(k)]
    return [{"accuracy": float(c / n), "eval_loss": float(s / n)} for c, s in zip(correct, loss_sum, strict=True)]


def _run_clients_round(
    bank: AdapterBank,
    tokenizer: PreTrainedTokenizerBase,
    *,
    phase: PhaseSpec,
    states: Sequence[Mapping[str, torch.Tensor]],
    payloads: Sequence[Mapping[str, torch.Tensor]],
    upload_keys: Sequence[Sequence[str]],
    train_data: Sequence[EncodedExamples | EncodedInstructions],
    val_data: Sequence[EncodedExamples | EncodedInstructions],
    settings: LocalTraining,
    seeds: Sequence[int],
    device: torch.device,
    clients: Sequence[int | None] | None = None,
    rnd: int | None = None,
    upload_transforms: Sequence[UploadTransform] = (),
) -> list[ClientResult]:
    """Train ``len(states)`` clients for one round in slots 0..k-1 at once, then evaluate each.

    Every client must hold as many training examples as the others (so their step counts and
    batch sizes agree) and as many validation examples. Each client's batch order comes from its
    own seed, and its upload is cut as one client alone cuts it (``clients[j]`` its id, for the
    upload transforms), exactly as in :func:`run_client_round`.
    """
    k = len(states)
    if k > bank.num_slots:
        raise ValueError(f"{k} clients do not fit {bank.num_slots} adapter slots")
    if len({len(d) for d in train_data}) != 1 or len({len(d) for d in val_data}) != 1:
        raise ValueError("clients trained together need equal numbers of training and of validation examples")
    ids: Sequence[int | None] = [None] * k if clients is None else clients
    if len(ids) != k:
        raise ValueError(f"{len(ids)} client ids for {k} clients")
    inputs = [{**state, **payload} for state, payload in zip(states, payloads, strict=True)]
    # Slot j's rows draw their dropout masks from seeds[j], as client j alone would (run_client_round).
    losses = train_slots(
        bank, tokenizer, phase=phase, inputs=inputs, train_data=train_data, settings=settings, seeds=seeds,
        device=device, slot_losses=_per_client_loss,
    )  # fmt: skip
    if settings.generation is not None and settings.generation.do_sample:
        torch.manual_seed(seeds[0])
    evaluations = evaluate_together(bank, tokenizer, val_data, settings, device)
    results = []
    for j in range(k):
        state = bank.read_slot(j)
        metrics = {
            # The mean in float32 (one client alone averages in float64, as each always has).
            "train_loss": float(np.mean(np.ascontiguousarray(losses[:, j]))) if len(losses) else float("nan"),
            "steps": len(losses),
            **evaluations[j],
            "num_train": len(train_data[j]),
            "num_val": len(val_data[j]),
        }
        upload = client_upload(
            state,
            inputs[j],
            upload_keys[j],
            upload_transforms,
            client=ids[j],
            rnd=rnd,
            seed=seeds[j],
            received=payloads[j],
        )
        results.append(ClientResult(state=state, upload=upload, metrics=metrics))
    bank.configure(phase, active_slots=1)
    return results


@functools.wraps(_run_clients_round)
def run_clients_round(bank: AdapterBank, tokenizer: PreTrainedTokenizerBase, **kwargs: Any) -> list[ClientResult]:
    with precision_context(kwargs["device"], kwargs["settings"].precision):
        return _run_clients_round(bank, tokenizer, **kwargs)
