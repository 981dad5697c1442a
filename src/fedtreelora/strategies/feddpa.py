"""FedDPA: a global adapter trained by FedAvg plus a local adapter, mixed per test instance."""

from __future__ import annotations

from collections.abc import Sequence

from fedtreelora.adapters import ExpertSpec, PhaseSpec
from fedtreelora.strategies.fedit import FedIT
from fedtreelora.strategies.options import FedDPAOptions
from fedtreelora.strategies.registry import register
from fedtreelora.train.instance_weighting import InstanceWeighting


@register
class FedDPA(FedIT[FedDPAOptions]):
    """FedDPA (Yang, Long, Shen, Jiang, Blumenstein, "Dual-Personalizing Adapter for Federated
    Foundation Models", NeurIPS 2024).

    Each client holds a global adapter (one LoRA, averaged over all clients by FedAvg, A and B
    separately) and a local adapter (one LoRA it keeps). Training mixes them with fixed weights
    ``(1 - local_weight) * global + local_weight * local`` (0.5 / 0.5 as in the authors' code).
    At evaluation FedDPA's instance-wise dynamic weighting sets, for each test instance x, the local
    adapter's weight ``alpha(x) = max_weight * mean_j cos(e(x), e(x_j))`` over ``num_reference``
    (5) of the client's training instances x_j drawn at random for that instance, and the global
    adapter's weight ``1 - alpha(x)`` (see :class:`InstanceWeighting`); ``inference="fixed"`` keeps
    the training weights instead.

    Shared: the global adapter (trained, averaged over all clients). Local: the local adapter
    (trained, never sent). Frozen: backbone and head.
    On the wire each round: up, the client's global adapter (one LoRA); down, the averaged global
    adapter (one LoRA, from round 1 on).

    Implemented as in the paper and the authors' code, except (simplifications):

    - Both adapters train together in every local step (their gradients come from the same mixed
      forward). The paper's FedDPA-T alternates (the global adapter, then the local adapter with the
      global one frozen); FedDPA-F fine-tunes the local adapter after federated training.
    - e(x) is the backbone's last hidden layer with the local adapter alone (the authors' code also
      embeds with the local adapter), mean-pooled over non-padding tokens (their ``avg`` option; their
      default, the last token, suits a decoder: ``pooling="last"``); ``pooling="cls"`` takes [CLS]. For
      instruction data the instance is the prompt.
      Reference draws come from the client's round seed. As in the authors' code alpha can be
      negative for a dissimilar instance (the global weight then exceeds 1).
    - The instance-wise weighting runs in the client's evaluation (``PhaseSpec.evaluate``); a run
      with ``train.clients_per_pass > 1`` must evaluate through that hook too.
    """

    name = "feddpa"  # paper, table rank, options: its entry in strategies/registry.py (read without torch)
    expert_names = ("global", "local")
    trunk_expert = None  # not exported as a trunk (yet); FedIT's "shared" expert does not exist here

    def phase(self, rnd: int) -> PhaseSpec:
        opts = self.options
        evaluate = None
        if opts.inference == "instance":
            evaluate = InstanceWeighting(
                global_slot=0,
                local_slot=1,
                max_weight=opts.max_weight,
                num_reference=opts.num_reference,
                pooling=opts.pooling,
            )
        return PhaseSpec(
            experts=(ExpertSpec("global"), ExpertSpec("local")),
            mixer="fixed",
            fixed_weights=(1.0 - opts.local_weight, opts.local_weight),
            name="warmup" if self.is_warmup(rnd) else "federated",
            evaluate=evaluate,
        )

    def upload_keys(self, rnd: int, client: int) -> Sequence[str]:
        return self.expert_keys("global")
