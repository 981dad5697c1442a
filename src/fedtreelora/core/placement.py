"""Where a client that arrives after the tree is built goes, and who is in the federation each round.

Pure functions on label and distance arrays: no adapters, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np


def nearest_cluster(labels: np.ndarray, distances: np.ndarray, candidates: np.ndarray | None = None) -> int:
    """The cluster at the smallest average distance from a newcomer (the average-linkage criterion).

    Args:
        labels: (members,) int cluster id of each member.
        distances: (members,) the newcomer's distance to each member.
        candidates: cluster ids to choose among (each must have a member); None: every id in ``labels``.
    Returns:
        the chosen id; a tie goes to the smallest id.
    Raises:
        ValueError: shapes differ, or there is no candidate.
    """
    labels = np.asarray(labels)
    distances = np.asarray(distances, dtype=np.float64)
    if labels.shape != distances.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and distances {distances.shape} must be equal 1-d shapes")
    ids = np.unique(labels) if candidates is None else np.unique(np.asarray(candidates))
    if ids.size == 0:
        raise ValueError("no cluster to place the newcomer in")
    means = [float(distances[labels == g].mean()) for g in ids]
    return int(ids[int(np.argmin(means))])  # argmin: the first (smallest id) of equal means


def place_in_tree(labels: np.ndarray, distances: np.ndarray, *, nested: bool = True) -> np.ndarray:
    """A newcomer's cluster at every layer: shallow to deep, the nearest cluster of each layer (smallest
    average distance to its members, :func:`nearest_cluster`); with ``nested`` only among the clusters
    that lie inside the newcomer's cluster of the layer above, so the partitions stay nested.

    Args:
        labels: (layers, members) int cluster id of each existing member at each layer, nested from
            one layer to the next when ``nested``.
        distances: (layers, members) the newcomer's distance to each member at each layer (pass the
            same row at every layer to place by one distance, e.g. the layer mean).
        nested: respect the nesting (FedTreeLoRA's one tree); False places every layer on its own
            (the ``independent`` ablation).
    Returns:
        (layers,) int64 the newcomer's cluster id at each layer (ids of ``labels``).
    Raises:
        ValueError: shapes differ, there are no members, or ``labels`` is not nested where ``nested``.
    """
    labels = np.asarray(labels)
    distances = np.asarray(distances, dtype=np.float64)
    if labels.shape != distances.shape or labels.ndim != 2:
        raise ValueError(f"labels {labels.shape} and distances {distances.shape} must be equal (layers, members)")
    if labels.shape[1] == 0:
        raise ValueError("no member to place the newcomer near")
    if nested:
        _check_nested(labels)
    out = np.empty(labels.shape[0], dtype=np.int64)
    inside = np.ones(labels.shape[1], dtype=bool)  # members of the newcomer's cluster one layer up
    for layer in range(labels.shape[0]):
        candidates = np.unique(labels[layer][inside]) if nested else None
        out[layer] = nearest_cluster(labels[layer], distances[layer], candidates)
        if nested:
            inside = labels[layer] == out[layer]
    return out


def _check_nested(labels: np.ndarray) -> None:
    """Raise ValueError unless every cluster of layer l + 1 lies inside one cluster of layer l."""
    for layer in range(1, labels.shape[0]):
        for g in np.unique(labels[layer]):
            parents = np.unique(labels[layer - 1][labels[layer] == g])
            if parents.size != 1:
                raise ValueError(
                    f"labels are not nested: cluster {int(g)} of layer {layer} spans clusters "
                    f"{parents.tolist()} of layer {layer - 1}; pass nested=False"
                )


@dataclass(frozen=True)
class Membership:
    """Who is in the federation in each round (0-based rounds).

    Attributes:
        num_clients: N.
        join: client -> the first round it takes part in (clients not listed: round 0).
        leave: client -> the first round it no longer takes part in (clients not listed: never leave).
    """

    num_clients: int
    join: Mapping[int, int] = field(default_factory=dict)
    leave: Mapping[int, int] = field(default_factory=dict)

    def joins(self, client: int) -> int:
        """The first round ``client`` takes part in."""
        return int(self.join.get(client, 0))

    def is_present(self, rnd: int, client: int) -> bool:
        """Whether ``client`` is in the federation in round ``rnd``."""
        leaves = self.leave.get(client)
        return self.joins(client) <= rnd and (leaves is None or rnd < leaves)

    def present(self, rnd: int) -> list[int]:
        """The clients in the federation in round ``rnd``, ascending."""
        return [k for k in range(self.num_clients) if self.is_present(rnd, k)]

    def has_left(self, rnd: int, client: int) -> bool:
        """Whether ``client`` left at or before round ``rnd``."""
        leaves = self.leave.get(client)
        return leaves is not None and leaves <= rnd

    @property
    def changes(self) -> bool:
        """Whether anyone joins late or leaves."""
        return any(r > 0 for r in self.join.values()) or bool(self.leave)
