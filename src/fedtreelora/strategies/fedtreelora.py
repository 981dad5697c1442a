"""FedTreeLoRA: layer-wise sharing through one tree of client clusters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from fedtreelora.adapters import ExpertSpec, PhaseSpec
from fedtreelora.core import SharingPlan, group_means, group_means_for, layer_distances, plan_sharing
from fedtreelora.core.placement import place_in_tree
from fedtreelora.core.tree import relabel_by_first_appearance
from fedtreelora.strategies.base import FederationContext, Tensors, as_payloads
from fedtreelora.strategies.common import (
    ClusteredAfterWarmup,
    b_matrices_by_module,
    distances_to_members,
    flatten_by_owner,
    remember_b,
    unflatten_by_owner,
    update_alignment,
)
from fedtreelora.strategies.options import FedTreeLoRAOptions
from fedtreelora.strategies.registry import register


@register
class FedTreeLoRA(ClusteredAfterWarmup[FedTreeLoRAOptions]):
    """FedTreeLoRA (Bian, Wang, Zhang, Xu, ICML 2026, arXiv 2603.13282).

    Warm-up: every client trains its own LoRA; nothing is shared. After the last warm-up round the
    server compares the clients' B matrices layer by layer, builds one tree (average linkage on the
    layer-mean distance) and picks a cut per layer, coarse in shallow layers (a shared trunk),
    finer in deep ones (branches). Every later round each client receives, per layer and module, its
    cluster expert (mean of its cluster's uploads) and an external expert (mean of everyone else's,
    zero where its cluster is everyone).

    Shared: the cluster expert (A and B, trained, averaged within each layer's cluster). Local: the
    lambda logits (one per layer and module, never sent). Frozen: the external expert, backbone, head.
    On the wire each round: up, the trained cluster expert (one LoRA); down, cluster and external
    experts (two LoRAs).

    Ablations (options, defaults give the method above):

    - ``cut_mode="fixed"``: every layer shares among the same ``fixed_clusters`` clusters of the one tree.
    - ``cut_mode="independent"``: each layer clusters the clients on its own distance matrix with its
      own average-linkage tree; its count is chosen like the method's (tau for one cluster, silhouette
      otherwise, candidates within the window above the previous layer's count), but partitions of
      consecutive layers need not nest. ``plan.tree`` then holds the tree of the layer-mean distance,
      for plotting only. With ``tau="auto"`` the same relabelling test admits counts (it never tests
      the layer's own tree, which is built from the distances it would be scored on), relabelling
      within the previous layer's clusters; the layer's clusters are then its own tree's cut.
    - ``external="none"``: the cluster expert alone (mixer ``single``); down one LoRA.
    - ``external="per_cluster"``: one frozen expert per other cluster of the layer (slots
      ``other_1 ...`` in cluster-id order, unused slots stay zero and contribute nothing); down up to
      ``max_clusters`` LoRAs. The cut search considers only counts up to ``max_clusters`` (in every
      ``cut_mode`` but ``fixed``, whose ``fixed_clusters`` may not exceed it). With the lambda mixer each other cluster's B is
      scaled by that cluster's share of the clients outside (by count, or examples under
      ``weighting="examples"``), so that ``(1 - lambda)`` weighs their sum as it weighs the one
      external expert; with the router they are sent unscaled.
    - ``mixer="router"``: a per-token softmax router over the experts instead of lambda, trained and
      kept by the client (never sent).

    Beyond the paper, ``personal=True`` adds a private ``personal`` expert per client after warm-up:
    trained, kept, never averaged, acting at weight 1 on top of the mix (``lambda * cluster + (1 -
    lambda) * external + personal``; ``cluster + personal`` where a layer is shared by everyone). It
    starts at zero (``personal_init="zero"``: up and down links unchanged) or as the client's own
    adapter at the end of warm-up (``"warmup"``: the client's last warm-up upload comes back in its
    payload until its first accepted federated update, usually the first federated round; a client
    that did not upload in the last warm-up round starts from zero).

    Federations that change (``federation.join`` / ``leave``; beyond the paper): a client that arrives
    after the tree is built trains alone for ``join_warmup_rounds`` rounds (from the initialisation or,
    with ``join_start="trunk"``, the shared trunk), counted in no average, then is placed shallow to deep
    in the nearest cluster of each layer inside its cluster of the layer above
    (:func:`~fedtreelora.core.placement.place_in_tree`, layer-mean B distance to the members' warm-up
    B), recorded in ``placements``. A client that has left counts in no average or share; a cluster that
    empties leaves zero experts behind. ``replan_every=R`` revisits the plan every R federated rounds
    (``plans`` records each): it moves clients whose B updates since the last re-plan point away from
    their clusters' experts (``replan_from="updates"``) or rebuilds the tree from the latest uploaded B
    (``"uploads"``).
    """

    name = "fedtreelora"  # paper, table rank, options: its entry in strategies/registry.py (read without torch)
    expert_names = ("cluster", "external")
    trunk_expert = "cluster"
    trained_expert = "cluster"
    zero_init_experts: tuple[str, ...] = ("external",)
    # The personal expert's A is drawn last: with and without it, warm-up computes the same thing.
    drawn_last_experts = ("personal",)

    def __init__(self, options: FedTreeLoRAOptions, context: FederationContext) -> None:
        super().__init__(options, context)
        # The frozen experts are filled by the server: start at zero. The personal expert trains: random A.
        self.zero_init_experts = tuple(n for n in self.experts_for(options)[1:] if n != "personal")
        self.plan: SharingPlan | None = None
        self.distances: np.ndarray | None = None
        self._payloads: dict[int, Tensors] = {}
        # personal_init="warmup": each client's last warm-up adapter, sent back once as its personal expert
        self._personal_start: dict[int, Tensors] = {}
        # with replan_every, every client's latest uploaded B (warm-up or federated): what a re-plan compares
        # under replan_from="uploads", and the start of a client's next update where no payload replaced it
        self._latest_b: dict[int, Tensors] = {}
        # with replan_from="updates": each placed client's B update summed over the federated rounds since
        # the last plan (uploaded B minus the B it trained from); emptied at every plan
        self._updates_b: dict[int, Tensors] = {}
        # late clients (federation.join) whose own warm-up has had an accepted upload
        self._started: set[int] = set()
        #: where and when each late client was placed: {"client", "round", "joined", "labels"}
        self.placements: list[dict[str, Any]] = []
        #: every plan the run made: {"round", "cuts", "labels"} (more than one with ``replan_every``)
        self.plans: list[dict[str, Any]] = []
        #: the clients the current plan's tree was built over (its leaves, in order)
        self.tree_clients: list[int] = []

    @property
    def lambda_init(self) -> float:
        return self.options.lambda_init

    @classmethod
    def experts_for(cls, options: FedTreeLoRAOptions) -> tuple[str, ...]:
        external = getattr(options, "external", "mean")
        personal = ("personal",) if getattr(options, "personal", False) else ()
        if external == "none":
            return ("cluster", *personal)
        if external == "per_cluster":
            others = (f"other_{j}" for j in range(1, options.max_clusters))
            return ("cluster", *others, *personal)
        return (*cls.expert_names, *personal)

    def phase(self, rnd: int) -> PhaseSpec:
        names = self.experts_for(self.options)
        shared = [n for n in names if n != "personal"]
        frozen = tuple(ExpertSpec(n, train_a=False, train_b=False) for n in shared[1:])
        if self.is_warmup(rnd):  # the personal expert (if any) waits, frozen at B = 0: warm-up is local training
            idle = tuple(ExpertSpec(n, train_a=False, train_b=False) for n in names[len(shared) :])
            return PhaseSpec(experts=(ExpertSpec(names[0]), *frozen, *idle), mixer="single", name="warmup")
        own = tuple(ExpertSpec(n, residual=True) for n in names[len(shared) :])
        experts = (ExpertSpec(names[0]), *frozen, *own)
        if len(shared) == 1:
            return PhaseSpec(experts=experts, mixer="single")
        return PhaseSpec(
            experts=experts, mixer=self.options.mixer, train_mixer=True, single_layers=self.shared_by_all()
        )

    @property
    def join_warmup_rounds(self) -> int:
        """Rounds a late client trains alone before it is placed (``join_warmup_rounds``, default ``warmup_rounds``)."""
        return self.options.join_warmup_rounds or self.options.warmup_rounds

    def joins_late(self, client: int) -> bool:
        """Whether ``client`` arrives after the tree is built (``federation.join`` at or after the first
        federated round): it then trains its own warm-up before it is placed."""
        return self.context.membership.joins(client) >= self.options.warmup_rounds

    def in_late_warmup(self, rnd: int, client: int) -> bool:
        """Whether round ``rnd`` is one of a late client's own warm-up rounds."""
        joins = self.context.membership.joins(client)
        return self.joins_late(client) and joins <= rnd < joins + self.join_warmup_rounds

    def client_phase(self, rnd: int, client: int) -> PhaseSpec:
        """The round's phase, or the warm-up phase during a late client's own warm-up."""
        return self.phase(0) if self.in_late_warmup(rnd, client) else self.phase(rnd)

    def shared_by_all(self) -> frozenset[int]:
        """Layers where every client's cluster is the whole federation (one cluster): there is no external
        expert, so the cluster expert acts alone at weight 1 and no mixer trains (one cluster at every
        layer is FedIT). Empty before the plan exists."""
        if self.plan is None:
            return frozenset()
        return frozenset(int(layer) for layer in np.flatnonzero(self.plan.cuts == 1))

    def payload(self, rnd: int, client: int) -> Tensors:
        if self.is_warmup(rnd):
            return {}
        if self.in_late_warmup(rnd, client):
            # join_start="trunk": the shared trunk rides along until the client has trained with it
            if self.options.join_start == "trunk" and client not in self._started:
                return self.trunk(rnd)
            return {}
        payload = dict(self._payloads.get(client, {}))
        # The personal expert's start rides along until the client has trained with it (aggregate drops it).
        payload.update(self._personal_start.get(client, {}))
        return payload

    def upload_keys(self, rnd: int, client: int) -> Sequence[str]:
        return self.expert_keys("cluster")

    def trunk(self, rnd: int) -> Tensors:
        """The cluster expert of the trunk layers (one cluster: everyone shares it), as the clients in the
        federation in round ``rnd`` receive it; empty before the plan exists or without a trunk layer."""
        trunk = self.shared_by_all()
        holders = [c for c in self.context.present(rnd) if c in self._payloads and not self.in_late_warmup(rnd, c)]
        if not trunk or not holders:
            return {}
        return {
            k: v.clone()
            for k, v in self._payloads[holders[0]].items()
            if ".cluster." in k and self.site_of(k).layer in trunk
        }

    def build_plan(self, uploads: Mapping[int, Tensors]) -> SharingPlan:
        """Distances from the clients' B matrices, then the clusters of every layer (``cut_mode``)."""
        per_module = b_matrices_by_module(uploads, sorted(uploads), self.context, "cluster")
        self.distances = layer_distances(per_module, metric=self.options.distance)
        return self.plan_from_distances(self.distances)

    def plan_from_distances(self, distances: np.ndarray) -> SharingPlan:
        """The sharing plan for (layers, clients, clients) distances under ``cut_mode`` and the
        ``max_clusters`` cap of ``external="per_cluster"``
        (:func:`~fedtreelora.core.plan.plan_sharing`)."""
        opts = self.options
        return plan_sharing(
            distances,
            opts.tau,
            opts.window,
            linkage_method=opts.linkage,
            level=opts.auto_level,
            permutations=opts.auto_permutations,
            seed=opts.auto_seed,
            max_clusters=opts.max_clusters if opts.external == "per_cluster" else None,
            cut_mode=opts.cut_mode,
            fixed_clusters=opts.fixed_clusters,
        )

    def aggregate(self, rnd: int, uploads: Mapping[int, Tensors]) -> dict[str, Any]:
        if self.options.replan_every:  # only a re-plan reads them: other runs' checkpoints stay as they were
            if self.options.replan_from == "updates":
                self._add_updates(rnd, uploads)
            remember_b(self._latest_b, uploads)
        if self.remember_warmup(rnd, uploads):
            return {}
        late = {c: up for c, up in uploads.items() if self.in_late_warmup(rnd, c)}
        uploads = {c: up for c, up in uploads.items() if c not in late}  # a late warm-up is shared with no one
        remember_b(self._warmup_b, late)
        self._started.update(late)
        info: dict[str, Any] = {"aggregated": len(uploads)}
        if late:
            info["late_warmup"] = sorted(late)
        if self.plan is None:
            self.plan = self._plan_from_warmup(rnd)
            info["cuts"] = self.plan.cuts.tolist()
            self._record_plan(rnd)
            if self.options.personal and self.options.personal_init == "warmup":
                self._personal_start = {
                    c: {k.replace(".cluster.", ".personal."): v.clone() for k, v in up.items()}
                    for c, up in uploads.items()
                }
        else:  # federated rounds: these clients trained from their personal start, it is theirs now
            for c in uploads:
                self._personal_start.pop(c, None)
            every = self.options.replan_every
            if every and (rnd - self.options.warmup_rounds + 1) % every == 0 and self._replan(rnd):
                info["replanned"] = self.plan.cuts.tolist()
        clients = sorted(uploads)
        labels = self.plan.labels
        # late clients whose own warm-up ends with this round, placed by their latest warm-up B
        ending = [
            c
            for c in range(self.context.num_clients)
            if labels[0, c] < 0
            and c in self._warmup_b
            and self.joins_late(c)
            and rnd == self.context.membership.joins(c) + self.join_warmup_rounds - 1
        ]
        placed_now = [c for c in clients if labels[0, c] < 0]
        for c in ending:
            self._place(rnd, labels, c, self._warmup_b[c])
            if self.options.personal and self.options.personal_init == "warmup" and c in late:
                self._personal_start[c] = {k.replace(".cluster.", ".personal."): v.clone() for k, v in late[c].items()}
        for c in placed_now:
            self._place(rnd, labels, c, uploads[c])
        if placed_now or ending:
            info["placed"] = sorted([*placed_now, *ending])
        if not clients:
            return info
        targets = [c for c in range(self.context.num_clients) if labels[0, c] >= 0]
        staying = self.staying(rnd, labels[0])
        weights = self.weights(clients, self.options.weighting)
        payloads: dict[int, Tensors] = {c: dict(self._payloads.get(c, {})) for c in targets}
        for key in uploads[clients[0]]:
            layer = self.site_of(key).layer
            values = self.stack(uploads, clients, key)
            inside, outside, has_inside, has_outside = group_means_for(
                values, labels[layer][clients], labels[layer][targets], weights
            )
            inside_rows = as_payloads(inside)
            outside_rows = as_payloads(outside) if self.options.external == "mean" else []
            external_key = key.replace(".cluster.", ".external.")
            for i, c in enumerate(targets):
                if has_inside[i]:  # else no cluster member took part: the client keeps its own cluster expert
                    payloads[c][key] = inside_rows[i]
                # No one outside the client's cluster took part: it keeps the external expert it holds,
                # unless everyone outside has left (then there is no external expert: zero).
                if self.options.external == "mean" and has_outside[i]:
                    payloads[c][external_key] = outside_rows[i]
                elif external_key in payloads[c] and not (staying & (labels[layer] != labels[layer, c])).any():
                    payloads[c][external_key] = torch.zeros_like(payloads[c][external_key])
            if self.options.external == "per_cluster":
                own = as_payloads(group_means(values, labels[layer][clients], weights)[0])
                self._add_other_clusters(rnd, labels, payloads, key, clients, own, targets)
        self._payloads.update(payloads)
        return info

    def staying(self, rnd: int, labels: np.ndarray) -> np.ndarray:
        """(clients,) bool: placed (``labels`` >= 0) and not gone by round ``rnd``, so whose uploads can
        count in averages and shares (a client counts through the last round it takes part in)."""
        membership = self.context.membership
        gone = np.array([membership.has_left(rnd, c) for c in range(labels.shape[0])], dtype=bool)
        staying: np.ndarray = (labels >= 0) & ~gone
        return staying

    def _plan_from_warmup(self, rnd: int) -> SharingPlan:
        """The plan over every client that uploaded in warm-up (and is still in the federation after
        round ``rnd``); the others get label -1 until they are placed (:meth:`_place`)."""
        membership = self.context.membership
        members = [c for c in self.warmup_members() if not membership.has_left(rnd + 1, c)] or self.warmup_members()
        self.tree_clients = members
        return self._expand(self.build_plan({c: self._warmup_b[c] for c in members}), members)

    def _expand(self, plan: SharingPlan, members: list[int]) -> SharingPlan:
        """``plan`` (over ``members``) with labels for the whole federation: -1 for the others."""
        n = self.context.num_clients
        if len(members) == n:
            return plan
        labels = np.full((plan.num_layers, n), -1, dtype=np.int64)
        labels[:, members] = plan.labels
        return replace(plan, labels=labels)

    def _add_updates(self, rnd: int, uploads: Mapping[int, Tensors]) -> None:
        """``replan_from="updates"``: add each placed client's B update of round ``rnd`` (its uploaded B
        minus the B it trained from: the payload's, else its own previous upload, which it kept) to its
        sum since the last plan. Warm-up rounds, a late client's own warm-up and a client's first upload
        after it missed the plan add nothing (there is no plan yet, or the server does not know the start)."""
        if self.plan is None or self.is_warmup(rnd):
            return
        for c, upload in uploads.items():
            if self.plan.labels[0, c] < 0 or self.in_late_warmup(rnd, c):
                continue
            sent, previous = self._payloads.get(c, {}), self._latest_b.get(c, {})
            update: Tensors = {}
            for key, value in upload.items():
                if not key.endswith(".lora_B"):
                    continue
                start = sent.get(key, previous.get(key))
                if start is None:  # the server never saw this client's start: no update this round
                    update = {}
                    break
                update[key] = value - start
            if not update:
                continue
            total = self._updates_b.get(c)
            self._updates_b[c] = update if total is None else {k: total[k] + v for k, v in update.items()}

    def _replan(self, rnd: int) -> bool:
        """``replan_every`` after round ``rnd``, over the placed clients still in the federation:
        ``replan_from="updates"`` moves each client to the branches its B updates since the last re-plan
        point along (:meth:`_realign`); ``"uploads"`` rebuilds the tree and the cuts from their latest
        uploaded B (a client without one leaves the tree and is placed again on its next upload).
        Personal states stay with the clients; payloads follow the new clusters from this round's averages
        on. False when fewer than two clients could be compared (the plan stays)."""
        assert self.plan is not None
        if self.options.replan_from == "updates":
            return self._realign(rnd)
        membership = self.context.membership
        members = [
            c
            for c in range(self.context.num_clients)
            if self.plan.labels[0, c] >= 0 and c in self._latest_b and not membership.has_left(rnd + 1, c)
        ]
        if len(members) < 2:
            return False
        self.plan = self._expand(self.build_plan({c: self._latest_b[c] for c in members}), members)
        self.tree_clients = members
        self._record_plan(rnd)
        return True

    def _realign(self, rnd: int) -> bool:
        """Keep the tree's branches and move the clients whose learning turned away from their clusters:
        a client's B update summed since the last re-plan is compared with the cluster expert each member
        received this round (one minus their cosine, :func:`~fedtreelora.strategies.common.update_alignment`).
        A client stays while its update still points along its own clusters' experts (mean cosine over the
        layers >= 0); else it is placed shallow to deep in the nearest cluster inside its cluster of the
        layer above, by the layer mean as :meth:`_place` places (each layer on its own under
        ``cut_mode="independent"``). Every client is placed against the clusters as they were, then all
        move at once; emptied clusters disappear and ids are renumbered by first appearance. Returns False
        when fewer than two members hold a cluster expert (nothing changes then)."""
        assert self.plan is not None
        membership = self.context.membership
        members = [
            c
            for c in range(self.context.num_clients)
            if self.plan.labels[0, c] >= 0 and c in self._payloads and not membership.has_left(rnd + 1, c)
        ]
        updates, self._updates_b = self._updates_b, {}
        movers = [c for c in members if c in updates]
        if len(members) < 2 or not movers:
            return False
        old = self.plan.labels
        new = old.copy()
        independent = self.options.cut_mode == "independent"
        for c in movers:
            d = update_alignment(updates[c], self._payloads, members, self.context, self.trained_expert)
            if d[:, members.index(c)].mean() <= 1.0:  # it still learns along its own clusters' experts
                continue
            if not independent:
                d = np.broadcast_to(d.mean(axis=0), d.shape)
            new[:, c] = place_in_tree(old[:, members], d, nested=not independent)
        placed = new[0] >= 0
        for layer in range(new.shape[0]):
            new[layer, placed] = relabel_by_first_appearance(new[layer, placed])
        cuts = np.array([len(np.unique(row[placed])) for row in new], dtype=np.int64)
        self.plan = replace(self.plan, labels=new, cuts=cuts)
        self._record_plan(rnd)
        return True

    def _record_plan(self, rnd: int) -> None:
        """Keep the plan made after round ``rnd`` in :attr:`plans`."""
        assert self.plan is not None
        self.plans.append({"round": rnd, "cuts": self.plan.cuts.tolist(), "labels": self.plan.labels.tolist()})

    def _place(self, rnd: int, labels: np.ndarray, client: int, upload: Tensors) -> None:
        """Put a client that missed warm-up (or arrived late) into the plan after round ``rnd`` by its B
        (``upload``): shallow to deep, the nearest cluster of each layer by average distance to the
        members' warm-up B, among the clusters inside its cluster of the layer above
        (:func:`~fedtreelora.core.placement.place_in_tree`). The distance is the one the tree is built
        on, the layer mean; under ``cut_mode="independent"`` each layer uses its own distances and
        ignores nesting. Members: placed clients still in the federation (all placed ones if none is).
        ``labels``: the plan's, updated in place; the placement is recorded in :attr:`placements`."""
        membership = self.context.membership
        placed = [c for c in range(self.context.num_clients) if labels[0, c] >= 0 and c in self._warmup_b]
        members = [c for c in placed if not membership.has_left(rnd + 1, c)] or placed
        d = distances_to_members(
            self._warmup_b, members, upload, self.context, self.trained_expert, self.options.distance
        )  # (layers, members)
        remember_b(self._warmup_b, {client: upload})
        independent = self.options.cut_mode == "independent"
        if not independent:
            d = np.broadcast_to(d.mean(axis=0), d.shape)
        labels[:, client] = place_in_tree(labels[:, members], d, nested=not independent)
        self.placements.append(
            {
                "client": client,
                "round": rnd,
                "joined": membership.joins(client),
                "labels": labels[:, client].tolist(),
            }
        )

    def _add_other_clusters(
        self,
        rnd: int,
        plan_labels: np.ndarray,
        payloads: dict[int, Tensors],
        key: str,
        clients: list[int],
        inside: list[torch.Tensor],
        targets: list[int],
    ) -> None:
        """``external="per_cluster"``: put every other cluster's expert factor ``key`` into slots
        ``other_1, other_2, ...`` (other clusters of the layer in id order) of each client's payload.

        Args:
            rnd: the round whose uploads these are (clients gone by then count in no share).
            plan_labels: (layers, clients) the plan's labels.
            inside: per participant, its own-cluster mean of ``key`` (a CPU float32 tensor).
        """
        labels = plan_labels[self.site_of(key).layer]  # (clients,) over the whole federation
        share = np.ones(self.context.num_clients)
        if self.options.weighting == "examples":
            share = np.asarray(self.context.num_examples, dtype=np.float64)
        scale_b = self.options.mixer == "lambda" and key.endswith(".lora_B")
        first: dict[int, int] = {}  # cluster id -> row in `inside` of one participating member
        for i, c in enumerate(clients):
            first.setdefault(int(labels[c]), i)
        # a client that has gone no longer counts in the other clusters' shares; a cluster it empties has no slot
        placed = self.staying(rnd, labels)
        for c in targets:
            others = [int(j) for j in np.unique(labels[placed]) if j != labels[c]]
            outside_total = share[placed & (labels != labels[c])].sum()
            for slot, cluster in enumerate(others, start=1):
                if cluster not in first:  # no member took part this round: the client keeps what it holds
                    continue
                value = inside[first[cluster]]
                if scale_b:
                    value = value * (share[placed & (labels == cluster)].sum() / outside_total)
                payloads[c][key.replace(".cluster.", f".other_{slot}.")] = value.clone()
            for slot in range(len(others) + 1, self.options.max_clusters):  # slots of emptied clusters: zero
                stale = key.replace(".cluster.", f".other_{slot}.")
                if stale in payloads[c]:
                    payloads[c][stale] = torch.zeros_like(payloads[c][stale])

    def state_dict(self) -> tuple[Tensors, dict[str, Any]]:
        tensors = flatten_by_owner(self._payloads)
        tensors.update({f"warmup/{k}": v for k, v in flatten_by_owner(self._warmup_b).items()})
        tensors.update({f"personal/{k}": v for k, v in flatten_by_owner(self._personal_start).items()})
        tensors.update({f"latest/{k}": v for k, v in flatten_by_owner(self._latest_b).items()})
        tensors.update({f"updates/{k}": v for k, v in flatten_by_owner(self._updates_b).items()})
        meta = {
            "plan": None if self.plan is None else self.plan.to_dict(),
            "distances": None if self.distances is None else self.distances.tolist(),
            "started": sorted(self._started),
            "placements": self.placements,
            "plans": self.plans,
            "tree_clients": self.tree_clients,
        }
        return tensors, meta

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        self.plan = None if meta.get("plan") is None else SharingPlan.from_dict(meta["plan"])
        self.distances = None if meta.get("distances") is None else np.asarray(meta["distances"])
        self._payloads = unflatten_by_owner(
            {k: v for k, v in tensors.items() if not k.startswith(("warmup/", "personal/", "latest/", "updates/"))}
        )
        self._updates_b = unflatten_by_owner(
            {k[len("updates/") :]: v for k, v in tensors.items() if k.startswith("updates/")}
        )
        self._latest_b = unflatten_by_owner(
            {k[len("latest/") :]: v for k, v in tensors.items() if k.startswith("latest/")}
        )
        self._started = {int(c) for c in meta.get("started", [])}
        self.placements = [dict(p) for p in meta.get("placements", [])]
        self.plans = [dict(p) for p in meta.get("plans", [])]
        self.tree_clients = [int(c) for c in meta.get("tree_clients", [])]
        self._personal_start = unflatten_by_owner(
            {k[len("personal/") :]: v for k, v in tensors.items() if k.startswith("personal/")}
        )
        self._warmup_b = unflatten_by_owner(
            {k[len("warmup/") :]: v for k, v in tensors.items() if k.startswith("warmup/")}
        )

    def sharing_labels(self) -> np.ndarray | None:
        return None if self.plan is None else self.plan.labels

    def summary(self) -> dict[str, Any]:
        """The plan; where and when late clients were placed (``placements``), when the tree was
        re-planned every plan (``plans``), and when the tree does not hold every client the clients it
        does (``tree_clients``, its leaves in order)."""
        if self.plan is None:
            return {}
        partial = self.tree_clients and len(self.tree_clients) < self.context.num_clients
        return {
            "plan": self.plan.to_dict(),
            **({"tree_clients": self.tree_clients} if partial else {}),
            **({"placements": self.placements} if self.placements else {}),
            **({"plans": self.plans} if len(self.plans) > 1 else {}),
        }
