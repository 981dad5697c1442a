"""Local training: every client trains its own LoRA; nothing is shared."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedtreelora.adapters import ExpertSpec, PhaseSpec
from fedtreelora.strategies.base import Strategy, Tensors
from fedtreelora.strategies.options import StrategyOptions
from fedtreelora.strategies.registry import register


@register
class Local(Strategy[StrategyOptions]):
    """Local-only training, the no-collaboration reference point.

    Shared: nothing. Local: the client's one LoRA (A and B). Frozen: backbone and head.
    On the wire each round: nothing in either direction.
    """

    name = "local"  # paper, table rank, options: its entry in strategies/registry.py (read without torch)
    expert_names = ("local",)

    def phase(self, rnd: int) -> PhaseSpec:
        return PhaseSpec(experts=(ExpertSpec("local"),), mixer="single", name="local")

    def sharing_labels(self) -> np.ndarray:
        return np.tile(np.arange(self.context.num_clients), (self.context.num_layers, 1))

    def payload(self, rnd: int, client: int) -> Tensors:
        return {}

    def upload_keys(self, rnd: int, client: int) -> Sequence[str]:
        return ()

    def aggregate(self, rnd: int, uploads: Mapping[int, Tensors]) -> dict[str, Any]:
        return {}

    def state_dict(self) -> tuple[Tensors, dict[str, Any]]:
        return {}, {}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        pass
