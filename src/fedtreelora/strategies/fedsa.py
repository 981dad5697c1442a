"""FedSA-LoRA: A averaged over all clients, B kept by each client."""

from __future__ import annotations

from collections.abc import Sequence

from fedtreelora.strategies.fedit import FedIT
from fedtreelora.strategies.options import FedSAOptions
from fedtreelora.strategies.registry import register


@register
class FedSA(FedIT[FedSAOptions]):
    """FedSA-LoRA (Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning",
    ICLR 2025).

    Both factors train locally every round; only A (which learns general knowledge) is sent and
    averaged over all clients; B (client-specific) stays on the client.

    Shared: A (trained, averaged over all clients, FedAvg). Local: B (trained, never sent). Frozen:
    backbone and head. :meth:`sharing_labels` reports the sharing of A (everyone in one cluster).
    On the wire each round: up, the client's A matrices; down, the averaged A matrices (from round 1
    on; in round 0 every client already holds the same A).
    """

    name = "fedsa"  # paper, table rank, options: its entry in strategies/registry.py (read without torch)
    trunk_expert = None  # B stays on the client: no whole expert is shared (FedIT's "shared" is not)

    def upload_keys(self, rnd: int, client: int) -> Sequence[str]:
        return [k for k in self.expert_keys("shared") if k.endswith(".lora_A")]
