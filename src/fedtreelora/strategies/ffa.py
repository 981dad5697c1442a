"""FFA-LoRA: A frozen at the shared random initialisation, only B trained and averaged."""

from __future__ import annotations

from collections.abc import Sequence

from fedtreelora.adapters import ExpertSpec, PhaseSpec
from fedtreelora.strategies.fedit import FedIT
from fedtreelora.strategies.options import FFAOptions
from fedtreelora.strategies.registry import register


@register
class FFA(FedIT[FFAOptions]):
    """FFA-LoRA (Sun, Li, Li, Ding, "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024).

    Every client starts from the same random A (the server's one initialisation) and never trains
    it; B starts at zero, is trained locally and averaged over all clients (FedAvg). Because A is the
    same everywhere, the average of the B's times A is exactly the average of the clients' updates.

    Shared: B (trained, averaged over all clients). Local: nothing of the client's own (A is the
    shared initialisation every client holds). Frozen: A, backbone, head.
    On the wire each round: up, the client's B matrices; down, the averaged B matrices (from round 1
    on). A never crosses the wire after the initial broadcast. Simplification: the paper's alpha
    scaling sweep and DP-SGD variants are not part of this baseline.
    """

    name = "ffa"  # paper, table rank, options: its entry in strategies/registry.py (read without torch)
    trunk_expert = "shared"  # B averaged, A the shared initialisation: the whole expert is shared

    def phase(self, rnd: int) -> PhaseSpec:
        return PhaseSpec(
            experts=(ExpertSpec("shared", train_a=False, train_b=True),),
            mixer="single",
            name="warmup" if self.is_warmup(rnd) else "federated",
        )

    def upload_keys(self, rnd: int, client: int) -> Sequence[str]:
        return [k for k in self.expert_keys("shared") if k.endswith(".lora_B")]
