"""What a run's clustering found, in words: the one line printed at the round the clusters are made, and
whether those clusters merely follow each client's majority class (its label prior).

Pure functions over a :class:`~fedtreelora.core.plan.SharingPlan` or the run summary's plain fields, so
the console (at the plan round), the run summary and the report say the same sentence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedtreelora.core.plan import AUTO, SharingPlan
from fedtreelora.core.structure import ari_by_layer

#: ARI against the clients' majority class from which the clusters are said to follow the label prior
LABEL_PRIOR_THRESHOLD = 0.8


def layer_span(layers: Sequence[int]) -> str:
    """1-based layers in words, runs collapsed: ``[5]`` -> "layer 6", ``[1, 3, 4, 5]`` -> "layers 2, 4-6".

    Args:
        layers: 0-based layer indices in increasing order (at least one).
    """
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    parts = [f"{r[0] + 1}" if len(r) == 1 else f"{r[0] + 1}-{r[-1] + 1}" for r in runs]
    return ("layer " if len(layers) == 1 else "layers ") + ", ".join(parts)


def _num(value: float) -> str:
    return f"{value:.2f}"


def _range(values: Sequence[float]) -> str:
    low, high = min(values), max(values)
    return _num(low) if _num(low) == _num(high) else f"{_num(low)}-{_num(high)}"


def _fedit_after_warmup(personal: bool) -> str:
    # With a personal expert the run is not FedIT: every client also keeps a private LoRA.
    return "FedIT plus a personal expert after warm-up" if personal else "FedIT after warm-up"


def tree_finding(plan: SharingPlan, *, personal: bool = False) -> str:
    """One line on what FedTreeLoRA's plan found: the layers that split, into how many clusters, and the
    evidence (silhouette against ``tau``; under ``tau: auto`` the tested silhouette against its null
    quantile where the count rises), or that nothing split and the run is FedIT after warm-up.

    Layers are 1-based, as in the report's figures. Examples::

        tree: layers 4-6 of 6 split into 2 clusters; silhouette 0.21-0.31 against tau 0.1
        tree: no structure found: no layer's silhouette beats tau 0.3 (best 0.08, layer 5); this run is
        FedIT after warm-up

    Args:
        plan: the plan; without candidate scores (``cut_mode: fixed``) the line gives no evidence.
        personal: the run adds a personal expert (then one cluster everywhere is not plain FedIT).
    """
    cuts = [int(c) for c in plan.cuts]
    n_layers = len(cuts)
    auto = plan.tau == AUTO
    split = [layer for layer, c in enumerate(cuts) if c > 1]
    if not split:
        return f"tree: no structure found: {_no_split_reason(plan)}; this run is {_fedit_after_warmup(personal)}"
    counts = sorted(set(cuts[layer] for layer in split))
    where = f"{layer_span(split)} of {n_layers} {'splits' if len(split) == 1 else 'split'}"
    if len(counts) == 1:
        where += f" into {counts[0]} clusters"
    else:
        by_count = [(c, [layer for layer in split if cuts[layer] == c]) for c in counts]
        # "2 clusters at 4-6, 3 at 7-8": the word "layers" once, in the span before
        parts = [
            f"{c}{' clusters' if i == 0 else ''} at {layer_span(ls).split(' ', 1)[1]}"
            for i, (c, ls) in enumerate(by_count)
        ]
        where += f" ({', '.join(parts)})"
    if auto:
        evidence = _auto_evidence(plan, cuts)
        return f"tree: {where}" + (f"; {evidence}" if evidence else "")
    kept = [
        plan.scores[layer][cuts[layer]]
        for layer in split
        if layer < len(plan.scores) and cuts[layer] in plan.scores[layer]
    ]
    return f"tree: {where}" + (f"; silhouette {_range(kept)} against tau {plan.tau:g}" if kept else "")


def _no_split_reason(plan: SharingPlan) -> str:
    """Why every layer kept one cluster: the best candidate's silhouette against tau, the candidate
    closest to passing the relabelling test, or that no candidate was tried."""
    if not plan.scores:  # cut_mode "fixed" (of one cluster), or a plan recorded without its search
        return "no layer splits"
    if plan.tau == AUTO:
        level = plan.auto.get("level")
        closest = [
            (stat - plan.null_quantiles[layer][c], stat, plan.null_quantiles[layer][c], layer)
            for layer, tested in enumerate(plan.test_scores)
            for c, stat in tested.items()
            if layer < len(plan.null_quantiles) and c in plan.null_quantiles[layer]
        ]
        if not closest:
            return "no cluster count could be tested (tau auto)"
        margin, stat, quantile, layer = max(closest)
        at = f"layer {layer + 1}{f', level {level:g}' if level is not None else ''}"
        if margin > 0:
            # It beat its own null here, yet nothing was admitted: a deeper layer or the grouping test refused it.
            return (
                f"no split was admitted (tested silhouette {_num(stat)} beats its null quantile {_num(quantile)} "
                f"at {at}, but not at every deeper layer, or the clients were not found to form groups)"
            )
        return (
            f"no split was admitted by the relabelling test (closest: tested silhouette {_num(stat)} against null "
            f"quantile {_num(quantile)}, {at})"
        )
    tried = [(score, layer) for layer, scores in enumerate(plan.scores) for c, score in scores.items() if c > 1]
    if not tried:
        return f"no split was tried (window {plan.window}, {plan.num_clients} clients)"
    best, layer = max(tried, key=lambda pair: (pair[0], -pair[1]))
    return f"no layer's silhouette beats tau {plan.tau:g} (best {_num(best)}, layer {layer + 1})"


def _auto_evidence(plan: SharingPlan, cuts: Sequence[int]) -> str:
    """The relabelling test at every layer where the count rises: tested silhouette against null quantile."""
    parts = []
    previous = 1
    for layer, c in enumerate(cuts):
        if c > previous and layer < len(plan.test_scores) and layer < len(plan.null_quantiles):
            stat, quantile = plan.test_scores[layer].get(c), plan.null_quantiles[layer].get(c)
            if stat is not None and quantile is not None:
                parts.append((stat, quantile, layer))
        previous = c
    if not parts:
        return ""
    level = plan.auto.get("level")
    suffix = f" (tau auto, level {level:g})" if level is not None else " (tau auto)"
    first, *rest = parts
    text = f"tested silhouette {_num(first[0])} against null quantile {_num(first[1])} at layer {first[2] + 1}"
    text += "".join(f", {_num(s)} against {_num(q)} at layer {layer + 1}" for s, q, layer in rest)
    return text + suffix


def clusters_finding(clusters: int, silhouette: Mapping[int, float]) -> str:
    """One line on a single clustering chosen by best silhouette (FedLEASE): the count kept, its
    silhouette and the counts it was chosen among.

    Example: ``clusters: 3 (silhouette 0.25, best of 2-4 clusters)``.
    """
    if not silhouette:
        return f"clusters: {clusters} (too few clients to compare cluster counts)"
    counts = sorted(silhouette)
    tried = "the only count tried" if len(counts) == 1 else f"best of {counts[0]}-{counts[-1]} clusters"
    kept = silhouette.get(clusters)
    score = "" if kept is None else f"silhouette {_num(kept)}, "
    return f"clusters: {clusters} ({score}{tried})"


def majority_classes(label_counts: np.ndarray) -> np.ndarray:
    """(clients,) each client's most frequent training label (ties go to the lower label id).

    Args:
        label_counts: (clients, labels) training examples of each label (generation: of each task).
    """
    counts = np.asarray(label_counts)
    if counts.ndim != 2:
        raise ValueError(f"label_counts must be (clients, labels), got shape {counts.shape}")
    return np.asarray(counts.argmax(axis=1), dtype=np.int64)


def majority_class_ari(sharing_labels: np.ndarray, label_counts: np.ndarray) -> np.ndarray:
    """Adjusted Rand index of each layer's sharing partition against the clients' majority-class partition.

    The majority-class partition groups clients by their most frequent training label: a plan that
    reproduces it shares along the label prior rather than along anything its adapters learned beyond it.

    Args:
        sharing_labels: (layers, clients) cluster ids; negative ids (clients not placed) are left out.
        label_counts: (clients, labels) training label counts.
    Returns:
        (layers,) float64 ARI (1: the layer's clusters are exactly the majority classes; about 0: unrelated,
        and also for one cluster against several classes); NaN where fewer than two clients are placed.
    """
    majority = majority_classes(label_counts)
    return ari_by_layer(np.asarray(sharing_labels), [[str(m) for m in majority]])[:, 0]


@dataclass(frozen=True)
class LabelPrior:
    """How closely a run's clusters follow its clients' majority class.

    Attributes:
        ari: (layers,) ARI of each layer's clusters against the majority-class partition (NaN: unscored).
        deepest: the deepest layer's ARI (NaN when unscored).
        planted: the deepest layer's best ARI against the planted groups over the hierarchy's depths, or
            None for a run without planted groups.
        follows: the deepest layer has more than one cluster, its ARI is at least the threshold, and it is
            higher than ``planted`` (when there is one).
    """

    ari: list[float]
    deepest: float
    planted: float | None
    follows: bool

    @property
    def text(self) -> str:
        """The sentence the report shows: a finding when the clusters follow the label prior, else the number."""
        if self.follows:
            return f"the clusters follow the clients' majority class (label prior), ARI {_num(self.deepest)}"
        value = "-" if np.isnan(self.deepest) else _num(self.deepest)
        return f"deepest layer's clusters against the clients' majority class: ARI {value}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN as None)."""

        def clean(v: float | None) -> float | None:
            return None if v is None or np.isnan(v) else float(v)

        return {
            "ari": [clean(v) for v in self.ari],
            "deepest": clean(self.deepest),
            "planted": clean(self.planted),
            "follows": self.follows,
            "text": self.text,
        }


def label_prior(
    sharing_labels: np.ndarray,
    label_counts: np.ndarray,
    planted_ari: np.ndarray | None = None,
    *,
    threshold: float = LABEL_PRIOR_THRESHOLD,
) -> LabelPrior:
    """Whether the deepest layer's clusters follow the clients' majority class rather than anything else.

    Args:
        sharing_labels: (layers, clients) cluster ids (negative: not placed).
        label_counts: (clients, labels) training label counts.
        planted_ari: (layers, depth) ARI of each layer against each depth of the planted groups, or None.
        threshold: the ARI from which the clusters are said to follow the label prior.
    """
    labels = np.asarray(sharing_labels)
    ari = majority_class_ari(labels, label_counts)
    deepest = float(ari[-1])
    planted = None
    if planted_ari is not None:
        row = np.asarray(planted_ari, dtype=np.float64)[-1]
        planted = float(np.nanmax(row)) if np.isfinite(row).any() else None
    placed = labels[-1][labels[-1] >= 0]
    clusters = len(set(placed.tolist()))
    follows = bool(clusters > 1 and deepest >= threshold and (planted is None or deepest > planted))
    return LabelPrior([float(v) for v in ari], deepest, planted, follows)


def run_finding(
    *,
    plan: Mapping[str, Any] | None = None,
    clusters: int | None = None,
    silhouette: Mapping[int, float] | None = None,
    ari: Sequence[Sequence[float | None]] | None = None,
    labels: Sequence[Sequence[int]] | None = None,
    label_counts: Sequence[Sequence[int]] | None = None,
    personal: bool = False,
) -> str | None:
    """The line a run prints where it makes its clusters: the plan's finding (``plan``: FedTreeLoRA) or
    the one clustering's (``clusters`` and ``silhouette``: FedLEASE), then the deepest layer's ARI against
    the planted groups (``ari``, when the run has them) and, when the clusters follow the clients'
    majority class (``labels``, ``label_counts``), that finding. None for a run that makes no clusters (or
    has not yet). The run summary's fields are read by :class:`fedtreelora.runfolder.RunSummary`.

    Args:
        plan: the plan as :meth:`SharingPlan.to_dict` writes it, or None.
        clusters: FedLEASE's cluster count, or None.
        silhouette: FedLEASE's candidate count -> silhouette.
        ari: (layers, depths) ARI of each layer's partition against the planted groups (None: undefined).
        labels: (layers, clients) sharing partition.
        label_counts: (clients, classes) each client's validation label counts.
        personal: the run adds a personal expert (``fedtreelora.personal``).
    """
    if plan is not None:
        line = tree_finding(SharingPlan.from_dict(dict(plan)), personal=personal)
    elif clusters is not None and silhouette is not None:
        line = clusters_finding(int(clusters), {int(k): float(v) for k, v in silhouette.items()})
    else:
        return None
    planted = _planted_ari(ari)
    if planted is not None and np.isfinite(planted[-1]).any():
        row = planted[-1]
        depth = int(np.nanargmax(row))
        at = f" (depth {depth + 1} of {len(row)})" if len(row) > 1 else ""
        line += f"; ARI {_num(float(row[depth]))} against the planted groups{at}"
    prior = recorded_label_prior(labels, label_counts, ari)
    if prior is not None and prior.follows:
        line += f"; {prior.text}"
    return line


def _planted_ari(ari: Sequence[Sequence[float | None]] | None) -> np.ndarray | None:
    if not ari:
        return None
    return np.asarray([[np.nan if v is None else float(v) for v in row] for row in ari], dtype=np.float64)


def recorded_label_prior(
    labels: Sequence[Sequence[int]] | None,
    label_counts: Sequence[Sequence[int]] | None,
    ari: Sequence[Sequence[float | None]] | None = None,
) -> LabelPrior | None:
    """:func:`label_prior` from recorded lists: ``labels`` (layers, clients), ``label_counts`` (clients,
    classes) and ``ari`` (layers, depths); None when the run recorded no sharing partition or no label
    counts, or they do not fit together."""
    if not labels or not label_counts:
        return None
    sharing = np.asarray(labels, dtype=np.int64).reshape(len(labels), -1)
    counts = np.asarray(label_counts, dtype=np.int64)
    if counts.ndim != 2 or counts.shape[0] != sharing.shape[1]:
        return None
    return label_prior(sharing, counts, _planted_ari(ari))
