"""Adapter tensors and scalars to and from Flower records (the only things that cross the wire)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord

Tensors = dict[str, torch.Tensor]


def to_array_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Float32 CPU tensors keyed as in :class:`fedtreelora.adapters.AdapterBank` -> an ``ArrayRecord``."""
    return ArrayRecord(
        torch_state_dict={k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    )


def from_array_record(record: ArrayRecord | None) -> Tensors:
    """Inverse of :func:`to_array_record` (an absent record is no tensors)."""
    if record is None or len(record) == 0:
        return {}
    return {k: v.to(torch.float32) for k, v in record.to_torch_state_dict().items()}
