"""Step 3 of FedTreeLoRA: one tree of clients and its exactly-c cuts."""

from __future__ import annotations

import numpy as np
from scipy.cluster.hierarchy import cut_tree, linkage
from scipy.spatial.distance import squareform


def relabel_by_first_appearance(labels: np.ndarray) -> np.ndarray:
    """Renumber cluster ids 0, 1, 2, ... in the order clients first show them.

    Args:
        labels: (clients,) int.
    Returns:
        (clients,) int64 with the same partition; client 0 is always in cluster 0.
    """
    mapping: dict[int, int] = {}
    out = np.empty(len(labels), dtype=np.int64)
    for i, value in enumerate(labels.tolist()):
        out[i] = mapping.setdefault(value, len(mapping))
    return out


def build_tree(global_distances: np.ndarray, method: str = "average") -> np.ndarray:
    """Agglomerative clustering of clients on one distance matrix.

    Args:
        global_distances: (clients, clients) symmetric, zero diagonal.
        method: scipy linkage method (the paper's choice is ``"average"``).
    Returns:
        scipy linkage matrix, (clients - 1, 4); (0, 4) for a single client.
    """
    n = global_distances.shape[0]
    if n < 2:
        return np.zeros((0, 4))
    condensed = squareform(global_distances, checks=False)
    matrix: np.ndarray = linkage(condensed, method=method)
    return matrix


def cut_exact(tree: np.ndarray, n_clients: int, n_clusters: int) -> np.ndarray:
    """Partition P_c of the tree into exactly ``n_clusters`` clusters, undoing merges in reverse order.

    Cutting by merge order (scipy ``cut_tree`` semantics) gives exactly c clusters even when merge
    heights tie, and cuts for c < c' are nested.

    Returns:
        (clients,) int64 labels numbered by first appearance.
    """
    if not 1 <= n_clusters <= n_clients:
        raise ValueError(f"n_clusters must be in [1, {n_clients}], got {n_clusters}")
    if n_clients == 1 or n_clusters == 1:
        return np.zeros(n_clients, dtype=np.int64)
    labels = cut_tree(tree, n_clusters=n_clusters)[:, 0]
    return relabel_by_first_appearance(labels)
