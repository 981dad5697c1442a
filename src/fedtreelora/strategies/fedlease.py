"""FedLEASE: one flat clustering of clients into LoRA experts, and a router over the experts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from fedtreelora.adapters import ExpertSpec, PhaseSpec
from fedtreelora.core import build_tree, cut_exact, group_means, layer_distances, mean_silhouette
from fedtreelora.strategies.base import FederationContext, StrategyOptions, Tensors, as_payloads, rename
from fedtreelora.strategies.common import (
    ClusteredAfterWarmup,
    b_matrices_by_module,
    flatten_by_owner,
    nearest_group,
    unflatten_by_owner,
)
from fedtreelora.strategies.registry import register


class FedLEASEOptions(StrategyOptions):
    warmup_rounds: int = Field(3, ge=1)
    """Rounds of purely local training before the clients are clustered from their B matrices."""
    max_clusters: int = Field(4, ge=2)
    """Largest number of clusters (experts) tried; the model holds this many experts per module."""
    distance: Literal["cosine", "frobenius"] = "cosine"
    """How B matrices are compared (FedLEASE uses one minus the cosine similarity)."""
    linkage: Literal["average", "complete", "single", "weighted"] = "average"
    """Linkage of the clustering (FedLEASE: average)."""
    weighting: Literal["uniform", "examples"] = "uniform"
    """Expert averages within a cluster: unweighted or weighted by client example count."""


@register
class FedLEASE(ClusteredAfterWarmup):
    """FedLEASE (Wang, Bian, Zhang, Xu, "Adaptive LoRA Experts Allocation and Selection for Federated
    Fine-Tuning", NeurIPS 2025, arXiv 2509.15087).

    Warm-up: every client trains its own LoRA; nothing is shared. After the last warm-up round the
    server clusters the clients ONCE, the same partition for every layer: distances between the
    clients' B matrices (per layer, then averaged over layers), an average-linkage tree, and the
    exactly-k cut whose mean silhouette (on that layer-mean distance) is best for k from 2 to
    ``max_clusters`` (and at most N - 1; with N <= 2 everyone is one cluster). Each cluster gets
    one expert LoRA, the mean of its members' LoRAs (A and B separately). Every later round each
    client receives all k experts: its own cluster's in slot ``own``, which it trains, and the other
    clusters' in slots ``other_1 ...`` (cluster-id order), frozen. A per-token softmax router over
    all experts (linear d_in -> max_clusters per layer and module) mixes them; it trains and stays
    on the client. The server averages the uploaded ``own`` experts within each cluster.

    Shared: the cluster experts (each trained by its members, averaged within the cluster). Local:
    the router (never sent). Frozen: the other clusters' experts, backbone, head.
    On the wire each round: up, the client's trained cluster expert (one LoRA); down, all k experts
    (k LoRAs).

    Simplifications: the router is dense (a softmax over all experts) instead of FedLEASE's adaptive
    top-M selection in an expanded (2M - 1)-way routing space. The model holds ``max_clusters``
    expert slots (the count is unknown until the clustering); when k < max_clusters the unused slots
    stay zero LoRAs, frozen and never sent, so they add nothing to the output, but the softmax still
    gives them weight (which the router can learn to shrink).
    """

    name = "fedlease"
    expert_names = ("own", "other_1", "other_2", "other_3")
    trained_expert = "own"
    paper = (
        "Wang, Bian, Zhang, Xu, Adaptive LoRA Experts Allocation and Selection for Federated Fine-Tuning, NeurIPS 2025"
    )
    Options = FedLEASEOptions

    def __init__(self, options: FedLEASEOptions, context: FederationContext) -> None:
        super().__init__(options, context)
        self.zero_init_experts = self.experts_for(options)[1:]
        self.labels: np.ndarray | None = None  # (clients,) cluster of every client
        self.scores: dict[int, float] = {}  # k -> mean silhouette
        self.distances: np.ndarray | None = None  # (layers, clients, clients)
        self._experts: dict[int, Tensors] = {}  # cluster -> its expert, under ".own." keys

    @classmethod
    def experts_for(cls, options: StrategyOptions) -> tuple[str, ...]:
        return ("own", *(f"other_{j}" for j in range(1, options.max_clusters)))  # type: ignore[attr-defined]

    @property
    def num_clusters(self) -> int:
        return 0 if self.labels is None else int(self.labels.max()) + 1  # -1 marks a client not yet placed

    def phase(self, rnd: int) -> PhaseSpec:
        names = self.experts_for(self.options)
        experts = (ExpertSpec("own"), *(ExpertSpec(n, train_a=False, train_b=False) for n in names[1:]))
        if self.is_warmup(rnd):
            return PhaseSpec(experts=experts, mixer="single", name="warmup")
        return PhaseSpec(experts=experts, mixer="router", train_mixer=True)

    def payload(self, rnd: int, client: int) -> Tensors:
        if self.is_warmup(rnd) or self.labels is None or self.labels[client] < 0:
            return {}  # not placed yet: a client that missed warm-up joins at its first upload
        own = int(self.labels[client])
        out = dict(self._experts.get(own, {}))
        others = [j for j in range(self.num_clusters) if j != own]
        for slot, cluster in enumerate(others, start=1):
            out.update(rename(self._experts.get(cluster, {}), "own", f"other_{slot}"))
        return out

    def upload_keys(self, rnd: int, client: int) -> Sequence[str]:
        return self.expert_keys("own")

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
        for c in clients:
            if self.labels[c] < 0:
                self._place(c, uploads[c])
                info.setdefault("placed", []).append(c)
        if not clients:
            return info
        labels = self.labels[clients]
        weights = self.weights(clients, self.options.weighting)
        for key in uploads[clients[0]]:
            inside = as_payloads(group_means(self.stack(uploads, clients, key), labels, weights)[0])
            for i, cluster in enumerate(labels.tolist()):
                self._experts.setdefault(cluster, {})[key] = inside[i]
        return info

    def _place(self, client: int, upload: Tensors) -> None:
        """A client that missed warm-up joins the cluster at the smallest average (layer-mean) B distance."""
        members = [c for c in range(self.context.num_clients) if self.labels[c] >= 0]
        d = self.newcomer_distances(client, upload, members)
        self.labels[client] = nearest_group(self.labels[members], d.mean(axis=0))

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
        return tensors, meta

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        self.labels = None if meta.get("labels") is None else np.asarray(meta["labels"], dtype=np.int64)
        self.scores = {int(k): float(s) for k, s in meta.get("scores", {}).items()}
        self.distances = None if meta.get("distances") is None else np.asarray(meta["distances"])
        self._experts = unflatten_by_owner({k: v for k, v in tensors.items() if not k.startswith("warmup/")})
        self._warmup_b = unflatten_by_owner(
            {k[len("warmup/") :]: v for k, v in tensors.items() if k.startswith("warmup/")}
        )
