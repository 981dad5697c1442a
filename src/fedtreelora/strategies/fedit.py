"""FedIT: FedAvg of LoRA A and B into one global adapter, optionally on some layers only."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch

from fedtreelora.adapters import ExpertSpec, PhaseSpec
from fedtreelora.core import group_means
from fedtreelora.strategies.base import FederationContext, Strategy, Tensors, as_payload
from fedtreelora.strategies.options import (  # noqa: F401  (re-exported: importable from here too)
    SHARED_LAYERS_FORMS,
    AllLayersOptions,
    FedITOptions,
    parse_shared_layers,
    resolve_shared_layers,
)
from fedtreelora.strategies.registry import register

FedITOptionsT = TypeVar("FedITOptionsT", bound=FedITOptions)
"""The options of FedIT or of a method built on it (FFA, FedSA, FedDPA)."""


@register
class FedIT(Strategy[FedITOptionsT]):
    """FedIT (Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning", ICASSP 2024).

    Shared: one LoRA (A and B averaged separately, FedAvg). Local: nothing persists that the server
    does not overwrite. Frozen: backbone and head.
    On the wire each round: up, the client's trained LoRA; down, the global LoRA (from round 1 on;
    in round 0 every client already holds the same initialisation).

    With ``warmup_rounds`` W > 0 the first W rounds train locally and share nothing (phase ``warmup``);
    the uploads of round W are the first to be averaged, so round W + 1 starts from FedAvg of the
    clients' warm-up LoRAs.

    Depth-limited FedAvg (``shared_layers``, default ``all``; the paper's motivating experiment): only
    the LoRAs of the selected transformer layers are shared as above. Local: the LoRAs (A and B) of the
    other layers, trained by each client, never sent and never overwritten, as in local training.
    Frozen: backbone and head, as always. On the wire: the shared layers' A and B only, both ways.
    ``first:K`` shares the K layers nearest the input, ``last:K`` the K deepest, ``none`` nothing (local
    training, exactly), ``all`` every layer (FedIT, exactly). :meth:`sharing_labels` puts every client
    in one cluster on a shared layer and each client alone on a local one; the summary records the
    shared layers (``shared_layers``).
    """

    name = "fedit"  # paper, table rank, options: its entry in strategies/registry.py (read without torch)
    expert_names: ClassVar[tuple[str, ...]] = ("shared",)
    trunk_expert: ClassVar[str | None] = "shared"

    def __init__(self, options: FedITOptionsT, context: FederationContext) -> None:
        super().__init__(options, context)
        # The layers whose uploads are averaged, ascending (a range error names this method's option).
        self.shared_layers = resolve_shared_layers(
            options.shared_layers, context.num_layers, f"{self.name}.shared_layers"
        )
        self._shared_sites = frozenset(s.name for s in context.sites if s.layer in self.shared_layers)
        self._global: Tensors = {}

    def is_warmup(self, rnd: int) -> bool:
        return rnd < self.options.warmup_rounds

    def phase(self, rnd: int) -> PhaseSpec:
        name = "warmup" if self.is_warmup(rnd) else "federated"
        return PhaseSpec(experts=(ExpertSpec(self.expert_names[0]),), mixer="single", name=name)

    def on_shared_layers(self, keys: Iterable[str]) -> list[str]:
        """The state keys among ``keys`` that belong to a shared layer's site, in their order."""
        return [k for k in keys if k.rsplit(".", 2)[0] in self._shared_sites]

    def sharing_labels(self) -> np.ndarray:
        labels = np.tile(np.arange(self.context.num_clients, dtype=np.int64), (self.context.num_layers, 1))
        labels[list(self.shared_layers)] = 0
        return labels

    def payload(self, rnd: int, client: int) -> Tensors:
        return dict(self._global)

    def upload_keys(self, rnd: int, client: int) -> Sequence[str]:
        return self.on_shared_layers(self.expert_keys("shared"))

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

    def summary(self) -> dict[str, Any]:
        return {"shared_layers": list(self.shared_layers)}

    def state_dict(self) -> tuple[Tensors, dict[str, Any]]:
        return dict(self._global), {}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        self._global = {k: v.clone() for k, v in tensors.items()}
