"""FedALT: an individual LoRA per client plus a frozen rest-of-world LoRA, mixed by a router."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedtreelora.adapters import ExpertSpec, PhaseSpec
from fedtreelora.core import group_means
from fedtreelora.strategies.base import FederationContext, Strategy, Tensors, as_payload, as_payloads
from fedtreelora.strategies.common import flatten_by_owner, unflatten_by_owner
from fedtreelora.strategies.options import FedALTOptions
from fedtreelora.strategies.registry import register


@register
class FedALT(Strategy[FedALTOptions]):
    """FedALT (Bian, Wang, Zhang, Xu, "FedALT: Federated Fine-Tuning through Adaptive Local Training
    with Rest-of-the-World LoRA", 2025, arXiv 2503.11880).

    Every client trains its own individual LoRA and keeps it (the server never overwrites it). The
    server sends each client a rest-of-world (RoW) LoRA: the mean of the OTHER clients' individual
    LoRAs (A and B averaged separately), which the client keeps frozen. Each adapted projection
    mixes the two with a per-token softmax router (a linear map d_in -> 2 per layer and module),
    trained locally and never sent.

    Shared: nothing is averaged into the client's own weights; the RoW LoRA carries the others'
    knowledge. Local: the individual LoRA (trained, uploaded each round but never replaced) and the
    router (trained, never sent). Frozen: the RoW LoRA, backbone, head.
    On the wire each round: up, the individual LoRA (one LoRA); down, the client's RoW LoRA (one
    LoRA, from round 1 on; round 0 trains against a zero RoW LoRA).

    The RoW of a client that took part in the last round averages the other participants; that of
    a client that did not averages every participant.
    """

    name = "fedalt"  # paper, table rank, options: its entry in strategies/registry.py (read without torch)
    expert_names = ("individual", "rest")
    zero_init_experts = ("rest",)

    def __init__(self, options: FedALTOptions, context: FederationContext) -> None:
        super().__init__(options, context)
        self._payloads: dict[int, Tensors] = {}

    def phase(self, rnd: int) -> PhaseSpec:
        experts = (ExpertSpec("individual"), ExpertSpec("rest", train_a=False, train_b=False))
        return PhaseSpec(experts=experts, mixer="router", train_mixer=True)

    def payload(self, rnd: int, client: int) -> Tensors:
        return dict(self._payloads.get(client, {}))

    def upload_keys(self, rnd: int, client: int) -> Sequence[str]:
        return self.expert_keys("individual")

    def aggregate(self, rnd: int, uploads: Mapping[int, Tensors]) -> dict[str, Any]:
        clients = sorted(uploads)
        if not clients:
            return {"aggregated": 0}
        weights = self.weights(clients, self.options.weighting)
        alone = np.arange(len(clients))  # every participant its own cluster: "outside" = the others
        together = np.zeros(len(clients), dtype=np.int64)
        row = {c: i for i, c in enumerate(clients)}
        payloads: dict[int, Tensors] = {c: {} for c in range(self.context.num_clients)}
        for key in uploads[clients[0]]:
            values = self.stack(uploads, clients, key)  # (participants, ...)
            others = as_payloads(group_means(values, alone, weights)[1])
            everyone = as_payload(group_means(values, together, weights)[0][0])
            rest_key = key.replace(".individual.", ".rest.")
            for c in payloads:
                payloads[c][rest_key] = others[row[c]] if c in row else everyone.clone()
        self._payloads = payloads
        return {"aggregated": len(clients)}

    def sharing_labels(self) -> np.ndarray:
        """Each client's trained LoRA is its own (the RoW LoRA is everyone else's mean)."""
        return np.tile(np.arange(self.context.num_clients), (self.context.num_layers, 1))

    def state_dict(self) -> tuple[Tensors, dict[str, Any]]:
        return flatten_by_owner(self._payloads), {}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        self._payloads = unflatten_by_owner(tensors)
