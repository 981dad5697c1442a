"""FedIT: FedAvg of LoRA A and B into one global adapter."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from fedtreelora.adapters import ExpertSpec, PhaseSpec
from fedtreelora.core import group_means
from fedtreelora.strategies.base import Strategy, StrategyOptions, Tensors, as_payload
from fedtreelora.strategies.registry import register


class FedITOptions(StrategyOptions):
    weighting: Literal["uniform", "examples"] = "uniform"
    """How uploads are averaged: ``uniform`` (equal clients, as in the paper's setup) or by example count."""
    warmup_rounds: int = Field(0, ge=0)
    """Rounds of purely local training before the first average (0: FedAvg from round 1). With the same
    warm-up, FedTreeLoRA with one cluster at every layer (``window=1``) computes exactly this."""


@register
class FedIT(Strategy):
    """FedIT (Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning", ICASSP 2024).

    Shared: one LoRA (A and B averaged separately, FedAvg). Local: nothing persists that the server
    does not overwrite. Frozen: backbone and head.
    On the wire each round: up, the client's trained LoRA; down, the global LoRA (from round 1 on;
    in round 0 every client already holds the same initialisation).

    With ``warmup_rounds`` W > 0 the first W rounds train locally and share nothing (phase ``warmup``);
    the uploads of round W are the first to be averaged, so round W + 1 starts from FedAvg of the
    clients' warm-up LoRAs.
    """

    name = "fedit"
    expert_names = ("shared",)
    paper = "Zhang et al., Towards Building the Federated GPT: Federated Instruction Tuning, ICASSP 2024"
    Options = FedITOptions

    def __init__(self, options: FedITOptions, context) -> None:  # type: ignore[no-untyped-def]
        super().__init__(options, context)
        self._global: Tensors = {}

    def is_warmup(self, rnd: int) -> bool:
        return rnd < self.options.warmup_rounds

    def phase(self, rnd: int) -> PhaseSpec:
        name = "warmup" if self.is_warmup(rnd) else "federated"
        return PhaseSpec(experts=(ExpertSpec(self.expert_names[0]),), mixer="single", name=name)

    def sharing_labels(self) -> np.ndarray:
        return np.zeros((self.context.num_layers, self.context.num_clients), dtype=np.int64)

    def payload(self, rnd: int, client: int) -> Tensors:
        return dict(self._global)

    def upload_keys(self, rnd: int, client: int) -> Sequence[str]:
        return self.expert_keys("shared")

    def aggregate(self, rnd: int, uploads: Mapping[int, Tensors]) -> dict[str, Any]:
        if rnd < self.options.warmup_rounds - 1:
            return {}  # warm-up goes on: nothing is shared
        clients = sorted(uploads)
        if not clients:
            return {"aggregated": 0}
        weights = self.weights(clients, self.options.weighting)
        labels = np.zeros(len(clients), dtype=np.int64)
        for key in uploads[clients[0]]:
            inside, _ = group_means(self.stack(uploads, clients, key), labels, weights)
            self._global[key] = as_payload(inside[0])
        return {"aggregated": len(clients)}

    def state_dict(self) -> tuple[Tensors, dict[str, Any]]:
        return dict(self._global), {}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        self._global = {k: v.clone() for k, v in tensors.items()}
