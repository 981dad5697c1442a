"""FedLEASE: one flat clustering of clients into LoRA experts, and an adaptive top-M router over the experts."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedtreelora.adapters import ExpertSpec, PhaseSpec
from fedtreelora.core import build_tree, cut_exact, group_means, layer_distances, mean_silhouette
from fedtreelora.strategies.base import FederationContext, Tensors, as_payloads, rename
from fedtreelora.strategies.common import (
    ClusteredAfterWarmup,
    b_matrices_by_module,
    flatten_by_owner,
    nearest_group,
    unflatten_by_owner,
)
from fedtreelora.strategies.options import FedLEASEOptions
from fedtreelora.strategies.registry import register


@register
class FedLEASE(ClusteredAfterWarmup[FedLEASEOptions]):
    """FedLEASE (Wang, Bian, Zhang, Xu, "Adaptive LoRA Experts Allocation and Selection for Federated
    Fine-Tuning", NeurIPS 2025, arXiv 2509.15087).

    Warm-up: every client trains its own LoRA; nothing is shared. After the last warm-up round the
    server clusters the clients ONCE, the same partition for every layer: distances between the
    clients' B matrices (per layer, then averaged over layers), an average-linkage tree, and the
    exactly-k cut whose mean silhouette (on that layer-mean distance) is best for k from 2 to
    ``max_clusters`` (and at most N - 1; with N <= 2 everyone is one cluster). Each cluster gets
    one expert LoRA, the mean of its members' LoRAs (A and B separately). Every later round each
    client receives all M = k experts: its own cluster's in slot ``own``, which it trains, and the
    other clusters' in slots ``other_1 ...`` (cluster-id order), frozen, plus ``expert_mask`` (which
    slots hold an expert) and its cluster's router. The experts are mixed per token by the adaptive
    top-M router (the ``topm`` mixer of :class:`~fedtreelora.adapters.MultiClientLoraLinear`). The
    server averages the uploaded ``own`` experts, and the routers, within each cluster.

    The router, as in the authors' code (github.com/lei-wang-link/FedLEASE; the paper describes the
    same expanded (2M - 1)-way routing space with top-M selection):

    - Shape: ``peft/tuners/lora.py``, ``Linear.__init__``: with ``adaptive`` on (``main.py`` sets it for
      the clustered clients) the router is ``nn.Linear(d_in, 2 * M - 1, bias=False)`` per adapted
      module, M (``lora_nums``) being the number of clusters the server found, so only the experts
      that exist are routed over.
    - Selection (``Linear.forward``): logits ``lora_route(x)`` for every token, from the module's input
      before LoRA dropout (dropout only feeds the experts); softmax over the 2M - 1 outputs in float32;
      ``torch.topk`` keeps the M largest; their probabilities are divided by their sum. Outputs 0 .. M - 1
      stand for experts 0 .. M - 1, outputs M .. 2M - 2 all for the client's own expert
      (``module_mapping[M:] = idx``), and every kept output adds its weight to its expert. Hence the
      own expert is always selected (M - 1 non-own outputs cannot fill M places) and a token uses
      between 1 and M distinct experts: the "adaptive" part. With M = 1 the own expert has weight 1.
    - Initialisation (``Linear.reset_parameters``): ``kaiming_uniform_(a=sqrt(5))``, i.e. uniform in
      ``+-1 / sqrt(d_in)``.
    - Training (``client.py``, ``Client.local_training``): the router trains together with the own
      expert's A and B (``lora_A{g}``, ``lora_B{g}``); the other experts are frozen; one AdamW learning
      rate for all of them (HF ``Trainer``).
    - Sharing (``server.py``, ``Server.aggregation``, called with ``route_aggregation=True`` by
      ``main.py``): every client uploads its router and receives the unweighted mean of the routers
      of its cluster's members. The router is shared within the cluster, not private.
    - At clustering (``main.py``, ``train_federated``): the clients are rebuilt with ``lora_n`` = the
      number of clusters and ``adaptive=True``; their warm-up LoRA moves into their cluster's slot
      and any ``lora_route`` key is skipped, so the router starts fresh, from its random init. During
      warm-up (``WarmupClient``, one expert, ``adaptive=False``) the router has one output, weight 1,
      and is not trained.

    Where we deviate, and why:

    - The model holds ``max_clusters`` expert slots and the router ``2 * max_clusters - 1`` rows,
      because M is known only after the clustering. Only the rows of the M existing experts and
      M - 1 extra rows are used; the others get zero probability (not just small), so the weights
      and gradients are those of the authors' (2M - 1)-way router, and empty slots get exactly zero
      weight. M reaches the client in the payload (``{site}.expert_mask``), not through the phase,
      so Flower nodes, which never aggregate, route over the same experts as the server's clustering.
    - Slot order: our own expert sits in slot 0 and the extra outputs point there; the authors index
      experts by cluster id and point the extra outputs at ``idx``. The router rows start i.i.d., so
      this is a relabelling; all members of a cluster share one order, so their routers average
      row by row as the authors' do.
    - Initialisation: one kaiming-uniform draw shared by all clients, in the run's initial state
      (before warm-up; the router is untouched until the clustering); the authors draw one per
      client when the clustered model is built. With ``router_sharing="cluster"`` members hold the
      same router after the first clustered round either way.
    - Learning rate: the router trains at ``train.mixer_lr`` like every mixer here; the authors use
      the LoRA learning rate. Set ``train.mixer_lr`` equal to ``train.lr`` to match them.
    - ``router_sharing="local"`` (ours) keeps each router on its client; ``weighting="examples"``
      (ours) weighs router means by example count like the experts' means.
    - A client that missed warm-up (ours; the authors have none) routes over its own expert alone
      (M = 1) until the server places it at its first upload; the router it uploads that round did
      not train, so it is left out of its cluster's router mean.
    - Not about the router: in the authors' first clustered round each client starts from its own
      warm-up LoRA and the other experts from their init (B = 0); here every expert is its cluster's
      mean warm-up LoRA from the first clustered round on.

    Shared: the cluster experts (each trained by its members, averaged within the cluster) and the
    router (averaged within the cluster; with ``router_sharing="local"`` it is local, never sent).
    Frozen: the other clusters' experts, backbone, head.
    On the wire each round after warm-up: up, the client's trained cluster expert (one LoRA) and its
    router (``2 * max_clusters - 1`` rows of d_in per module; the authors send 2M - 1); down, all M
    experts (M LoRAs), its cluster's mean router (from the second clustered round on) and the expert
    mask (``max_clusters`` numbers per module).
    """

    name = "fedlease"  # paper, table rank, options: its entry in strategies/registry.py (read without torch)
    expert_names = ("own", "other_1", "other_2", "other_3")
    trained_expert = "own"

    def __init__(self, options: FedLEASEOptions, context: FederationContext) -> None:
        super().__init__(options, context)
        self.zero_init_experts = self.experts_for(options)[1:]
        self.labels: np.ndarray | None = None  # (clients,) cluster of every client
        self.scores: dict[int, float] = {}  # k -> mean silhouette
        self.distances: np.ndarray | None = None  # (layers, clients, clients)
        self._experts: dict[int, Tensors] = {}  # cluster -> its expert, under ".own." keys
        self._routers: dict[int, Tensors] = {}  # cluster -> its members' mean top-M router

    @classmethod
    def experts_for(cls, options: FedLEASEOptions) -> tuple[str, ...]:
        return ("own", *(f"other_{j}" for j in range(1, options.max_clusters)))

    @property
    def num_clusters(self) -> int:
        return 0 if self.labels is None else int(self.labels.max()) + 1  # -1 marks a client not yet placed

    def phase(self, rnd: int) -> PhaseSpec:
        names = self.experts_for(self.options)
        experts = (ExpertSpec("own"), *(ExpertSpec(n, train_a=False, train_b=False) for n in names[1:]))
        if self.is_warmup(rnd):
            return PhaseSpec(experts=experts, mixer="single", name="warmup")
        return PhaseSpec(experts=experts, mixer="topm", train_mixer=True)

    def initial_state(self, generator: torch.Generator) -> Tensors:
        """The shared initial state, plus the top-M router's init and an expert mask of the own expert alone.

        Routers: uniform in ``+-1 / sqrt(d_in)`` as the authors' ``kaiming_uniform_(a=sqrt(5))``, drawn after
        everything the base class draws (so the LoRA init does not depend on this). Expert mask: (experts,)
        with only slot 0 set, so a client that has not been told the clusters uses its own expert alone.
        """
        state = super().initial_state(generator)
        for site in self.context.sites:
            key = f"{site.name}.topm_router"
            if key in self.context.state_shapes:
                shape = self.context.state_shapes[key]  # (2 * max_clusters - 1, d_in)
                state[key] = (torch.rand(shape, generator=generator) * 2.0 - 1.0) / math.sqrt(shape[-1])
            if f"{site.name}.expert_mask" in self.context.state_shapes:
                state[f"{site.name}.expert_mask"] = self._mask(1)
        return state

    def _mask(self, existing: int) -> torch.Tensor:
        """(max_clusters,) float32: 1 for the first ``existing`` expert slots, 0 for the rest."""
        mask = torch.zeros(self.options.max_clusters)
        mask[:existing] = 1.0
        return mask

    def router_keys(self) -> list[str]:
        """The top-M router's state key at every site."""
        return [f"{s.name}.topm_router" for s in self.context.sites]

    def payload(self, rnd: int, client: int) -> Tensors:
        if self.is_warmup(rnd) or self.labels is None or self.labels[client] < 0:
            return {}  # not placed yet: a client that missed warm-up joins at its first upload
        own = int(self.labels[client])
        out = dict(self._experts.get(own, {}))
        others = [j for j in range(self.num_clusters) if j != own]
        for slot, cluster in enumerate(others, start=1):
            out.update(rename(self._experts.get(cluster, {}), "own", f"other_{slot}"))
        # Slots 0 .. M - 1 hold the M experts; the client cannot tell an empty slot from a zero B.
        mask = self._mask(self.num_clusters)
        out.update({f"{s.name}.expert_mask": mask.clone() for s in self.context.sites})
        out.update(self._routers.get(own, {}))
        return out

    def upload_keys(self, rnd: int, client: int) -> Sequence[str]:
        if self.is_warmup(rnd) or self.options.router_sharing == "local":
            return self.expert_keys("own")
        return [*self.expert_keys("own"), *self.router_keys()]

    def cluster(self, uploads: Mapping[int, Tensors]) -> np.ndarray:
        """One partition of all clients from their uploaded B matrices.

        Returns:
            (clients,) int64 cluster ids numbered by first appearance.
        """
        clients = sorted(uploads)
        n = len(clients)
        per_module = b_matrices_by_module(uploads, clients, self.context, "own")
        self.distances = layer_distances(per_module, metric=self.options.distance)
        global_distance = self.distances.mean(axis=0)  # (clients, clients)
        tree = build_tree(global_distance, method=self.options.linkage)
        best_k, best_score = 1, -np.inf
        self.scores = {}
        for k in range(2, min(self.options.max_clusters, n - 1) + 1):
            score = mean_silhouette(global_distance, cut_exact(tree, n, k))
            self.scores[k] = score
            if score > best_score:  # strict: a tie keeps the smaller k
                best_k, best_score = k, score
        return cut_exact(tree, n, best_k)

    def aggregate(self, rnd: int, uploads: Mapping[int, Tensors]) -> dict[str, Any]:
        if self.remember_warmup(rnd, uploads):
            return {}
        info: dict[str, Any] = {"aggregated": len(uploads)}
        if self.labels is None:
            members = self.warmup_members()
            self.labels = np.full(self.context.num_clients, -1, dtype=np.int64)
            self.labels[members] = self.cluster({c: self._warmup_b[c] for c in members})
            info["clusters"] = self.num_clusters
            info["cuts"] = [self.num_clusters] * self.context.num_layers
        clients = sorted(uploads)
        labels = self.labels
        placed_now = [c for c in clients if labels[c] < 0]
        for c in placed_now:
            self._place(rnd, labels, c, uploads[c])
            info.setdefault("placed", []).append(c)
        if not clients:
            return info
        routers = set(self.router_keys())
        self._cluster_means(
            labels, uploads, clients, [k for k in uploads[clients[0]] if k not in routers], self._experts
        )
        # A client placed this round routed over its own expert alone: its router did not train.
        routed = [c for c in clients if c not in placed_now and routers <= uploads[c].keys()]
        if routed and self.options.router_sharing == "cluster":
            self._cluster_means(labels, uploads, routed, sorted(routers), self._routers)
        return info

    def _cluster_means(
        self,
        all_labels: np.ndarray,
        uploads: Mapping[int, Tensors],
        clients: list[int],
        keys: Sequence[str],
        store: dict[int, Tensors],
    ) -> None:
        """Store, per cluster of ``clients`` (``all_labels``: :attr:`labels`), the (weighted) mean of their
        uploads of ``keys``."""
        labels = all_labels[clients]
        weights = self.weights(clients, self.options.weighting)
        for key in keys:
            inside = as_payloads(group_means(self.stack(uploads, clients, key), labels, weights)[0])
            for i, cluster in enumerate(labels.tolist()):
                store.setdefault(cluster, {})[key] = inside[i]

    def _place(self, rnd: int, labels: np.ndarray, client: int, upload: Tensors) -> None:
        """A client that missed warm-up (or joined after it, ``federation.join``) joins, at its first upload
        (after round ``rnd``), the cluster at the smallest average (layer-mean) B distance to the members
        still in the federation (``labels``: :attr:`labels`, updated in place)."""
        placed = [c for c in range(self.context.num_clients) if labels[c] >= 0]
        members = [c for c in placed if not self.context.membership.has_left(rnd + 1, c)] or placed
        d = self.newcomer_distances(client, upload, members)
        labels[client] = nearest_group(labels[members], d.mean(axis=0))

    def sharing_labels(self) -> np.ndarray | None:
        return None if self.labels is None else np.tile(self.labels, (self.context.num_layers, 1))

    def summary(self) -> dict[str, Any]:
        if self.labels is None:
            return {}
        return {"clusters": self.num_clusters, "silhouette": {str(k): s for k, s in self.scores.items()}}

    def state_dict(self) -> tuple[Tensors, dict[str, Any]]:
        meta = {
            "labels": None if self.labels is None else self.labels.tolist(),
            "scores": {str(k): s for k, s in self.scores.items()},
            "distances": None if self.distances is None else self.distances.tolist(),
        }
        tensors = flatten_by_owner(self._experts)
        tensors.update({f"warmup/{k}": v for k, v in flatten_by_owner(self._warmup_b).items()})
        tensors.update({f"router/{k}": v for k, v in flatten_by_owner(self._routers).items()})
        return tensors, meta

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        self.labels = None if meta.get("labels") is None else np.asarray(meta["labels"], dtype=np.int64)
        self.scores = {int(k): float(s) for k, s in meta.get("scores", {}).items()}
        self.distances = None if meta.get("distances") is None else np.asarray(meta["distances"])
        self._experts = unflatten_by_owner(
            {k: v for k, v in tensors.items() if not k.startswith(("warmup/", "router/"))}
        )
        self._warmup_b = unflatten_by_owner(
            {k[len("warmup/") :]: v for k, v in tensors.items() if k.startswith("warmup/")}
        )
        self._routers = unflatten_by_owner(
            {k[len("router/") :]: v for k, v in tensors.items() if k.startswith("router/")}
        )
