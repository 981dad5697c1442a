"""Step 4 of FedTreeLoRA: the layer-wise cut search that turns one tree into a trunk and branches, and
its ablations (a fixed count everywhere, a tree per layer): every way a plan is made."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from sklearn.metrics import silhouette_samples

from fedtreelora.core.checks import as_float_array, require_distance_stack, require_positive_int
from fedtreelora.core.tau_auto import DEFAULT_LEVEL, DEFAULT_PERMUTATIONS, RelabellingTest, StageTests
from fedtreelora.core.tree import build_tree, cut_exact, relabel_by_first_appearance

AUTO = "auto"
"""The value of tau that replaces the fixed prior with a relabelling test (:mod:`fedtreelora.core.tau_auto`)."""

CutMode = Literal["tree", "fixed", "independent"]
CUT_MODES: tuple[CutMode, ...] = ("tree", "fixed", "independent")
"""How :func:`plan_sharing` cuts the layers: one tree searched layer by layer (the method), the same
fixed count everywhere, or each layer on its own tree."""


@dataclass(frozen=True)
class SharingPlan:
    """Who shares with whom at every layer.

    Attributes:
        cuts: (layers,) int64, number of clusters at each layer; never decreases with depth.
        labels: (layers, clients) int64, each client's cluster at each layer, numbered by first
            appearance; partitions are nested from one layer to the next.
        tree: scipy linkage matrix (clients - 1, 4) of the one tree, for plotting a dendrogram.
        scores: per layer, the candidate cluster counts and their scores (tau for c = 1, else
            the silhouette under that layer's distances), in the order they were tried. Under
            ``tau="auto"`` c = 1 has no score (it is what a layer keeps when nothing is admissible).
        tau: the score given to c = 1 (a prior for full sharing), or ``"auto"``.
        window: how many candidates each layer may look at, starting at the previous cut.
        null_quantiles: ``tau="auto"`` only: per layer, each tested candidate's critical value, the
            quantile of its own relabelling null at the test's level; empty otherwise.
        test_scores: ``tau="auto"`` only: per layer, each tested candidate's statistic (the mean
            silhouette, under the layer's distances, of the same count's cut of the tree built without
            that layer); a candidate passes where it exceeds its null quantile.
        admissible: ``tau="auto"`` only: per layer, the candidates that pass at that layer and at
            every deeper layer; the layer chooses among these and the previous count.
        auto: ``tau="auto"`` only: the test's settings (``level``, ``permutations``, ``seed``).
    """

    cuts: np.ndarray
    labels: np.ndarray
    tree: np.ndarray
    scores: list[dict[int, float]] = field(default_factory=list)
    tau: float | str = 0.0
    window: int = 1
    null_quantiles: list[dict[int, float]] = field(default_factory=list)
    test_scores: list[dict[int, float]] = field(default_factory=list)
    admissible: list[list[int]] = field(default_factory=list)
    auto: dict[str, float | int] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.cuts.shape[0])

    @property
    def num_clients(self) -> int:
        return int(self.labels.shape[1])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (lists of ints and floats)."""
        return {
            "cuts": self.cuts.tolist(),
            "labels": self.labels.tolist(),
            "tree": self.tree.tolist(),
            "scores": _per_layer_to_json(self.scores),
            "tau": self.tau,
            "window": self.window,
            "null_quantiles": _per_layer_to_json(self.null_quantiles),
            "test_scores": _per_layer_to_json(self.test_scores),
            "admissible": [[int(c) for c in layer] for layer in self.admissible],
            "auto": dict(self.auto),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SharingPlan:
        """Inverse of :meth:`to_dict`; dicts written before ``tau="auto"`` existed load with its fields empty."""
        tau = data.get("tau", 0.0)
        return cls(
            cuts=np.asarray(data["cuts"], dtype=np.int64),
            labels=np.asarray(data["labels"], dtype=np.int64).reshape(len(data["cuts"]), -1),
            tree=np.asarray(data["tree"], dtype=np.float64).reshape(-1, 4),
            scores=_per_layer_from_json(data.get("scores")),
            tau=AUTO if tau == AUTO else float(tau),
            window=int(data.get("window", 1)),
            null_quantiles=_per_layer_from_json(data.get("null_quantiles")),
            test_scores=_per_layer_from_json(data.get("test_scores")),
            admissible=[[int(c) for c in layer] for layer in data.get("admissible") or []],
            auto=dict(data.get("auto") or {}),
        )

    @classmethod
    def shared(cls, num_layers: int, num_clients: int) -> SharingPlan:
        """Everyone in one cluster at every layer (FedAvg); the plan FedIT implies."""
        return cls(
            cuts=np.ones(num_layers, dtype=np.int64),
            labels=np.zeros((num_layers, num_clients), dtype=np.int64),
            tree=np.zeros((0, 4)),
        )


def _per_layer_to_json(values: list[dict[int, float]]) -> list[dict[str, float]]:
    return [{str(c): float(v) for c, v in layer.items()} for layer in values]


def _per_layer_from_json(values: list[dict[str, Any]] | None) -> list[dict[int, float]]:
    return [{int(c): float(v) for c, v in layer.items()} for layer in values or []]


def mean_silhouette(distances: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette of a partition under precomputed distances; members of singleton clusters score 0.

    Args:
        distances: (clients, clients).
        labels: (clients,) with 2 <= number of clusters <= clients - 1.
    """
    return float(np.mean(silhouette_samples(distances, labels, metric="precomputed")))


def plan_sharing(
    distances: np.ndarray,
    tau: float | str,
    window: int,
    linkage_method: str = "average",
    *,
    level: float = DEFAULT_LEVEL,
    permutations: int = DEFAULT_PERMUTATIONS,
    seed: int = 0,
    max_clusters: int | None = None,
    cut_mode: CutMode = "tree",
    fixed_clusters: int | None = None,
) -> SharingPlan:
    """Choose how many clusters every layer shares among, shallow to deep: FedTreeLoRA's cut search and
    its ablations (``cut_mode``), in one place.

    ``cut_mode="tree"`` (the method): one tree, average linkage on the layer-mean distance. Layer l
    tries ``c_{l-1} <= c < min(N, c_{l-1} + window)`` (``c_0 = 1``) and keeps the best score: ``tau``
    for c = 1, else the mean silhouette of the tree's exactly-c cut under ``distances[l]``. Ties go to
    the smaller c (more sharing). With N <= 2 every layer stays at 1. Partitions nest from layer to layer.

    ``cut_mode="independent"``: the same search, but each layer's exactly-c partition is the cut of its
    own tree (``linkage_method`` on ``distances[l]``), so partitions need not nest; ``plan.tree`` is
    still the layer-mean tree, for plotting.

    ``cut_mode="fixed"``: every layer shares among the one tree's exactly-k cut, k =
    ``min(fixed_clusters, N)``; nothing is searched (``scores`` empty).

    With ``tau="auto"`` no prior is needed: a candidate c > c_{l-1} competes only when a relabelling
    test admits it (its held-out silhouette beats the ``level`` quantile of its own null at this layer
    and at every deeper layer, relabelling within layer l-1's clusters; :mod:`fedtreelora.core.tau_auto`);
    c_{l-1} is always allowed and is kept when nothing is admitted. A federation without structure then
    keeps every layer shared with probability at least ``level``. The test never scores a layer's own
    tree, which is built from the distances it would be tested on.

    Args:
        distances: (layers, clients, clients) from :func:`layer_distances`.
        tau: score of full sharing, in [-1, 1]; a layer leaves the root only when a partition's
            silhouette beats it. Or ``"auto"``.
        window: number of candidates per layer, >= 1. ``window = 1`` keeps every layer at 1 (FedIT).
        linkage_method: scipy linkage method; the paper's is ``"average"``.
        level: ``tau="auto"`` only: the test's level in (0, 1).
        permutations: ``tau="auto"`` only: random relabellings per layer and previous partition.
        seed: ``tau="auto"`` only: seed of the relabellings (same input and seed, same plan).
        max_clusters: the largest count any layer may take (None: no cap); the search scores, and under
            ``"auto"`` tests, only counts up to it. Under ``"fixed"``, ``fixed_clusters`` may not exceed it.
        cut_mode: ``"tree"``, ``"independent"`` or ``"fixed"`` (:data:`CUT_MODES`), as above.
        fixed_clusters: ``cut_mode="fixed"`` only (required there): the count every layer takes, >= 1.

    Returns:
        a :class:`SharingPlan`.
    """
    d = as_float_array(distances, "distances", 3)
    require_distance_stack(d, "distances")
    window = require_positive_int(window, "window", 1)
    tau = check_tau(tau)
    if cut_mode not in CUT_MODES:
        raise ValueError(f"cut_mode must be one of {CUT_MODES}, got {cut_mode!r}")
    cap = None if max_clusters is None else require_positive_int(max_clusters, "max_clusters", 1)
    n_layers, n_clients, _ = d.shape
    tree = build_tree(d.mean(axis=0), method=linkage_method)
    if cut_mode == "fixed":
        if fixed_clusters is None:
            raise ValueError("cut_mode='fixed' needs fixed_clusters, the count every layer takes")
        k = require_positive_int(fixed_clusters, "fixed_clusters", 1)
        if cap is not None and k > cap:
            raise ValueError(f"fixed_clusters ({k}) exceeds max_clusters ({cap})")
        k = min(k, n_clients)
        labels = np.tile(cut_exact(tree, n_clients, k), (n_layers, 1))
        return SharingPlan(np.full(n_layers, k, dtype=np.int64), labels, tree, [], tau, window)
    test = RelabellingTest(d, level, permutations, seed, linkage_method) if tau == AUTO else None
    partition = (
        _one_tree_partitions(tree, n_clients)
        if cut_mode == "tree"
        else _per_layer_tree_partitions(d, n_clients, linkage_method)
    )
    return search_cuts(d, tree, partition, tau=tau, window=window, test=test, cap=cap)


def _one_tree_partitions(tree: np.ndarray, n_clients: int) -> Callable[[int, int], np.ndarray]:
    """``(layer, c) -> (clients,)``: the exactly-c cut of the one ``tree`` (clients - 1, 4), whatever
    the layer (cached per c)."""
    partitions: dict[int, np.ndarray] = {1: np.zeros(n_clients, dtype=np.int64)}

    def partition(layer: int, c: int) -> np.ndarray:
        if c not in partitions:
            partitions[c] = cut_exact(tree, n_clients, c)
        return partitions[c]

    return partition


def _per_layer_tree_partitions(
    distances: np.ndarray, n_clients: int, linkage_method: str
) -> Callable[[int, int], np.ndarray]:
    """``(layer, c) -> (clients,)``: the exactly-c cut of the layer's own tree, ``linkage_method`` on
    ``distances[layer]`` (clients, clients) (each tree built on first use)."""
    layer_trees: dict[int, np.ndarray] = {}

    def partition(layer: int, c: int) -> np.ndarray:
        if layer not in layer_trees:
            layer_trees[layer] = build_tree(distances[layer], method=linkage_method)
        return cut_exact(layer_trees[layer], n_clients, c)

    return partition


def search_cuts(
    distances: np.ndarray,
    tree: np.ndarray,
    partition: Callable[[int, int], np.ndarray],
    *,
    tau: float | str,
    window: int,
    test: RelabellingTest | None,
    cap: int | None = None,
) -> SharingPlan:
    """The layer-by-layer candidate search behind :func:`plan_sharing`, for any way of cutting a layer.

    Layer l tries ``c_{l-1} <= c < min(N, c_{l-1} + window)`` (``c_0 = 1``; and ``c <= cap`` when a cap
    is given) and keeps the best score: ``tau`` for c = 1, else the mean silhouette of
    ``partition(l, c)`` under ``distances[l]``; ties go to the smaller c. Under ``tau="auto"`` (``test``
    given) a count above c_{l-1} competes only when the relabelling test, run within layer l-1's
    chosen partition, admits it; c = 1 then has no score.

    Args:
        distances: (layers, clients, clients), already checked.
        tree: (clients - 1, 4) linkage matrix stored in the plan (for plotting).
        partition: ``(layer, c) -> (clients,)`` int64 labels of the layer's exactly-c partition; c = 1
            must give all zeros. Cuts of one tree nest from layer to layer; cuts of per-layer trees
            need not.
        tau: score of c = 1 (already checked), or ``"auto"``.
        window: candidates per layer, >= 1.
        test: the relabelling test, exactly when ``tau == "auto"``.
        cap: the largest count any layer may take, or None.
    """
    n_layers, n_clients, _ = distances.shape
    cuts = np.ones(n_layers, dtype=np.int64)
    labels = np.zeros((n_layers, n_clients), dtype=np.int64)
    scores: list[dict[int, float]] = []
    quantiles: list[dict[int, float]] = []
    statistics: list[dict[int, float]] = []
    admissible: list[list[int]] = []
    previous = 1
    # (previous partition, its tests) under "auto". Keyed by the partition, not its count: cuts that
    # need not nest can keep a count while their clusters change, and the test is within the clusters.
    stage: tuple[bytes, StageTests] | None = None
    for layer in range(n_layers):
        top = max(previous + 1, min(n_clients, previous + window))
        if cap is not None:
            top = min(top, cap + 1)
        candidates = range(previous, top)
        allowed = set(candidates)
        if test is not None:
            above = [c for c in candidates if c > previous]
            parent = relabel_by_first_appearance(labels[layer - 1]) if layer else labels[0]
            if above and (stage is None or stage[0] != parent.tobytes()):
                stage = (parent.tobytes(), test.stage(parent, layer, above))
            tests = stage[1] if above and stage is not None else StageTests()
            allowed = {previous, *tests.admissible.get(layer, [])}
            quantiles.append(dict(tests.quantiles.get(layer, {})))
            statistics.append(dict(tests.statistics.get(layer, {})))
            admissible.append(list(tests.admissible.get(layer, [])))
        layer_scores: dict[int, float] = {}
        best_c, best_score = previous, -np.inf
        for c in candidates:
            if c == 1:
                if test is not None:
                    continue  # no score: c = 1 is what the layer keeps when nothing is admissible
                score = float(tau)
            else:
                score = mean_silhouette(distances[layer], partition(layer, c))
            layer_scores[c] = score
            if c in allowed and score > best_score:  # strict: a tie keeps the smaller c
                best_c, best_score = c, score
        cuts[layer] = best_c
        labels[layer] = partition(layer, best_c)
        scores.append(layer_scores)
        previous = best_c
    return SharingPlan(
        cuts=cuts,
        labels=labels,
        tree=tree,
        scores=scores,
        tau=tau,
        window=window,
        null_quantiles=quantiles,
        test_scores=statistics,
        admissible=admissible,
        auto={} if test is None else {"level": test.level, "permutations": test.permutations, "seed": test.seed},
    )


def check_tau(tau: object) -> float | str:
    """``tau`` as a float in [-1, 1], or ``"auto"``; else ``ValueError``."""
    if tau == AUTO:
        return AUTO
    if isinstance(tau, bool) or not isinstance(tau, (int, float, np.floating)) or not -1.0 <= float(tau) <= 1.0:
        raise ValueError(f"tau must be a number in [-1, 1] (a silhouette threshold) or 'auto', got {tau!r}")
    return float(tau)
