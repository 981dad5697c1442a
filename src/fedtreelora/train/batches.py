"""Tokenize a client's examples once per run and cut them into padded batches."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from fedtreelora.train.generation import EncodedInstructions, collate_instructions


@dataclass(frozen=True)
class EncodedExamples:
    """Token ids of a set of examples, unpadded.

    Attributes:
        input_ids: one list of token ids per example.
        token_type_ids: per example, or None when the tokenizer has none.
        labels: (n,) int64.
    """

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)


def encode(
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    text_pairs: list[str] | None,
    labels: np.ndarray,
    max_length: int,
) -> EncodedExamples:
    """Tokenize (and truncate) once; padding happens per batch."""
    enc = tokenizer(texts, text_pairs, truncation=True, max_length=max_length)
    return EncodedExamples(
        input_ids=enc["input_ids"],
        token_type_ids=enc.get("token_type_ids"),
        labels=np.asarray(labels, dtype=np.int64),
    )


def collate(
    tokenizer: PreTrainedTokenizerBase, data: EncodedExamples | EncodedInstructions, indices: np.ndarray
) -> dict[str, torch.Tensor]:
    """A padded batch: input_ids, attention_mask (and token_type_ids), labels; each (b, T), labels (b,)
    for classification and (b, T) for instruction data (see :func:`collate_instructions`)."""
    if isinstance(data, EncodedInstructions):
        return collate_instructions(tokenizer, [(data, indices)])
    features = []
    for i in indices:
        row = {"input_ids": data.input_ids[i]}
        if data.token_type_ids is not None:
            row["token_type_ids"] = data.token_type_ids[i]
        features.append(row)
    batch = tokenizer.pad(features, padding=True, return_tensors="pt")
    batch["labels"] = torch.as_tensor(data.labels[indices])
    return dict(batch)


def batch_indices(
    n: int, *, batch_size: int, epochs: int, steps: int | None, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """Shuffled example indices per step: ``epochs`` passes over ``n`` examples, or exactly ``steps``
    batches (reshuffling at each pass). The last batch of a pass may be smaller."""
    if n == 0:
        return
    total = steps if steps is not None else epochs * -(-n // batch_size)
    order, pos = rng.permutation(n), 0
    for _ in range(total):
        if pos >= n:
            order, pos = rng.permutation(n), 0
        yield order[pos : pos + batch_size]
        pos += batch_size


def train_batches(
    tokenizer: PreTrainedTokenizerBase,
    data: EncodedExamples | EncodedInstructions,
    *,
    batch_size: int,
    epochs: int,
    steps: int | None,
    rng: np.random.Generator,
) -> Iterator[dict[str, torch.Tensor]]:
    """Padded, shuffled training batches (see :func:`batch_indices`)."""
    for idx in batch_indices(len(data), batch_size=batch_size, epochs=epochs, steps=steps, rng=rng):
        yield collate(tokenizer, data, idx)


def collate_clients(
    tokenizer: PreTrainedTokenizerBase, parts: list[tuple[EncodedExamples | EncodedInstructions, np.ndarray]]
) -> dict[str, torch.Tensor]:
    """One batch holding several clients' rows, client after client, padded to a common length.

    Every part must have the same number of rows b, so rows ``[j*b, (j+1)*b)`` belong to client slot j.
    """
    sizes = {len(idx) for _, idx in parts}
    if len(sizes) != 1:
        raise ValueError(f"clients trained together need equal batch sizes, got {sorted(sizes)}")
    instruction_parts = [(data, idx) for data, idx in parts if isinstance(data, EncodedInstructions)]
    if len(instruction_parts) == len(parts):
        return collate_instructions(tokenizer, instruction_parts)
    features, labels = [], []
    for data, idx in parts:
        if isinstance(data, EncodedInstructions):
            raise TypeError("clients trained together need the same kind of data")
        for i in idx:
            row = {"input_ids": data.input_ids[i]}
            if data.token_type_ids is not None:
                row["token_type_ids"] = data.token_type_ids[i]
            features.append(row)
        labels.append(data.labels[idx])
    batch = dict(tokenizer.pad(features, padding=True, return_tensors="pt"))
    batch["labels"] = torch.as_tensor(np.concatenate(labels))
    return batch


def eval_batches(
    tokenizer: PreTrainedTokenizerBase, data: EncodedExamples, batch_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches in order, for evaluation."""
    for start in range(0, len(data), batch_size):
        yield collate(tokenizer, data, np.arange(start, min(start + batch_size, len(data))))
