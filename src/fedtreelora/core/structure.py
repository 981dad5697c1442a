"""How well a method's sharing partitions recover a planted hierarchy of client groups.

Group names nest with ``/`` (``news/plain``, ``news/flipped``, ``tweets/plain``); the planted partition
at depth h groups clients by the first h parts of their group's name. Each layer's sharing partition
(who is averaged with whom) is scored against every depth with the adjusted Rand index.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import adjusted_rand_score

SEPARATOR = "/"
"""Separates the levels of a group name."""


def planted_levels(names: Sequence[str]) -> list[list[str]]:
    """The planted partition at every depth of the hierarchy.

    Args:
        names: (clients,) each client's group name.
    Returns:
        (depth, clients) nested list: row h - 1 holds each client's label at depth h = 1..max depth, the
        prefix of its name with h parts (a name with fewer parts is its own label at every deeper depth).
    """
    parts = [name.split(SEPARATOR) for name in names]
    depth = max((len(p) for p in parts), default=0)
    return [[SEPARATOR.join(p[:h]) for p in parts] for h in range(1, depth + 1)]


def ari_by_layer(sharing_labels: np.ndarray, planted: Sequence[Sequence[str]]) -> np.ndarray:
    """Adjusted Rand index of each layer's sharing partition against each planted level.

    Args:
        sharing_labels: (layers, clients) int cluster id of every client at every layer; clients with a
            negative id (not placed in any cluster) are left out of that layer's score.
        planted: (levels, clients) each client's label at every level (:func:`planted_levels`).
    Returns:
        (layers, levels) float64 ARI: 1 for identical partitions, about 0 for unrelated ones (also for one
        cluster, or all singletons, against several groups), negative below chance; NaN where fewer than
        two clients are placed.
    """
    labels = np.asarray(sharing_labels)
    if labels.ndim != 2:
        raise ValueError(f"sharing_labels must be (layers, clients), got shape {labels.shape}")
    levels = [list(level) for level in planted]
    for h, level in enumerate(levels):
        if len(level) != labels.shape[1]:
            raise ValueError(f"planted level {h + 1} has {len(level)} clients but sharing_labels has {labels.shape[1]}")
    out = np.full((labels.shape[0], len(levels)), np.nan)
    for layer, row in enumerate(labels):
        placed = np.flatnonzero(row >= 0)
        if placed.size < 2:
            continue
        for h, level in enumerate(levels):
            out[layer, h] = adjusted_rand_score([level[k] for k in placed], row[placed])
    return out


def placement_agreement(
    sharing_labels: np.ndarray, planted: Sequence[Sequence[str]], newcomers: Sequence[int]
) -> np.ndarray:
    """How often late clients were placed among their own kind: per layer and planted depth, the share of
    ``newcomers`` whose cluster's other members (newcomers left out) are mostly of the newcomer's planted
    group at that depth (the plurality, ties counting as agreement).

    Args:
        sharing_labels: (layers, clients) int cluster ids, negative for clients not placed.
        planted: (levels, clients) each client's label at every depth (:func:`planted_levels`).
        newcomers: the late clients (each placed in the tree).
    Returns:
        (layers, levels) float64 in [0, 1]; NaN where no newcomer's cluster has another member.
    """
    labels = np.asarray(sharing_labels)
    levels = [list(level) for level in planted]
    late = set(int(k) for k in newcomers)
    out = np.full((labels.shape[0], len(levels)), np.nan)
    for layer, row in enumerate(labels):
        for h, level in enumerate(levels):
            hits: list[float] = []
            for k in sorted(late):
                if row[k] < 0:
                    continue
                others = [level[j] for j in np.flatnonzero(row == row[k]) if int(j) not in late]
                if not others:
                    continue
                counts = {name: others.count(name) for name in set(others)}
                hits.append(float(counts.get(level[k], 0) == max(counts.values())))
            if hits:
                out[layer, h] = float(np.mean(hits))
    return out
