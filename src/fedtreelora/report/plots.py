"""The report's figures, drawn headless.

Figures are plain :class:`matplotlib.figure.Figure` objects (no pyplot, so no GUI backend and no global
state); :func:`figure_png` renders them with Agg.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from scipy.cluster.hierarchy import dendrogram

from fedtreelora.core.tree import cut_exact, relabel_by_first_appearance
from fedtreelora.report.data import RunData

DPI = 110
UP_COLOR, DOWN_COLOR = "#4c72b0", "#dd8452"


def figure_png(fig: Figure, dpi: int = DPI) -> bytes:
    """Render a figure to PNG bytes with the Agg renderer."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    return buffer.getvalue()


# --- the client tree --------------------------------------------------------------------------------
def cut_height(tree: np.ndarray, n_clusters: int) -> float:
    """A height at which a horizontal line through the dendrogram separates exactly ``n_clusters``.

    Merge heights ``h`` (clients - 1,) ascend for average linkage; after the first ``n - c`` merges
    there are c clusters, so the line sits midway between merge ``n - c - 1`` and merge ``n - c``
    (0 below the first merge; above the root for c = 1). When those two merges tie, no height
    separates exactly c clusters (the run splits ties by merge order) and the tie height is returned.

    Args:
        tree: (clients - 1, 4) scipy linkage matrix.
        n_clusters: c, 1 <= c <= clients.
    """
    heights = np.sort(tree[:, 2])
    n = heights.shape[0] + 1
    if not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters must be in [1, {n}], got {n_clusters}")
    top = float(heights[-1]) if heights.size else 0.0
    lower = float(heights[n - n_clusters - 1]) if n_clusters < n else 0.0
    upper = float(heights[n - n_clusters]) if n_clusters > 1 else top + max(0.08 * top, 1e-6)
    return 0.5 * (lower + upper)


def cut_heights(tree: np.ndarray, cuts: Sequence[int]) -> list[float]:
    """:func:`cut_height` of every layer's cut (layers in order)."""
    return [cut_height(tree, int(c)) for c in cuts]


def leaf_order(run: RunData) -> list[int]:
    """Clients in dendrogram leaf order (clusters side by side), clients outside the tree after them;
    0..N-1 without a tree."""
    tree, clients, n = run.tree, run.tree_clients, run.num_clients
    if tree is None or clients is None or len(clients) < 2:
        return list(range(n))
    order = [clients[int(i)] for i in dendrogram(tree, no_plot=True)["leaves"]]
    return order + [k for k in range(n) if k not in order]


def _layer_span(layers: Sequence[int]) -> str:
    """'layer 3' or 'layers 1-4' (1-based) for a run of consecutive 0-based layers."""
    first, last = layers[0] + 1, layers[-1] + 1
    return f"layer {first}" if first == last else f"layers {first}-{last}"


def plot_tree(run: RunData) -> tuple[Figure, dict[int, float]] | None:
    """The client dendrogram with a horizontal line at every layer's cut.

    Layers sharing the same cut share one line, labelled with their layers. A layer whose clusters are
    not a cut of this tree (``cut_mode: independent``) gets no line.

    Returns:
        (figure, {layer: line height}), or None when the run has no client tree.
    """
    tree, clients = run.tree, run.tree_clients
    if tree is None or clients is None or len(clients) < 2:
        return None
    n = len(clients)
    plan = run.plan or {}
    cuts = [int(c) for c in plan.get("cuts") or []]
    labels = np.asarray(plan.get("labels") or [], dtype=np.int64).reshape(len(cuts), -1) if cuts else None
    fig = Figure(figsize=(max(6.0, 0.45 * n + 3.5), 4.2))
    ax = fig.add_subplot()
    deepest = min(max(cuts), n) if cuts else 1
    threshold = cut_height(tree, deepest) if deepest > 1 else 0.0
    dendrogram(
        tree,
        ax=ax,
        labels=[str(k) for k in clients],
        color_threshold=threshold,
        above_threshold_color="#555555",
        leaf_font_size=9,
    )
    heights: dict[int, float] = {}
    by_cut: dict[int, list[int]] = {}
    skipped: list[int] = []
    for layer, c in enumerate(cuts):
        if not 1 <= c <= n:
            skipped.append(layer)
            continue
        partition = cut_exact(tree, n, c)
        if labels is not None and not (
            labels.shape[1] > max(clients)
            and np.array_equal(relabel_by_first_appearance(labels[layer, clients]), partition)
        ):
            skipped.append(layer)
            continue
        by_cut.setdefault(c, []).append(layer)
    sorted_heights = np.sort(tree[:, 2])
    for c, layers in sorted(by_cut.items()):
        y = cut_height(tree, c)
        tie = 1 < c < n and np.isclose(sorted_heights[n - c - 1], sorted_heights[n - c])
        for layer in layers:
            heights[layer] = y
        ax.axhline(y, color="#c44e52", linestyle="--", linewidth=1.2, gid=f"cut-{c}")
        text = f"{_layer_span(layers)}: {c} cluster{'s' if c > 1 else ''}" + (" (tie, by merge order)" if tie else "")
        ax.annotate(
            text,
            xy=(1.0, y),
            xycoords=("axes fraction", "data"),
            xytext=(4, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
            color="#c44e52",
        )
    title = "Client tree (average linkage on B distances) and each layer's cut"
    plans = run.summary.get("plans") or []
    if len(plans) > 1:  # replan_every: the tree shown is the last plan's
        title += f"\n(the last of {len(plans)} plans, made after round {int(plans[-1]['round']) + 1})"
    if n < run.num_clients:
        outside = run.num_clients - n
        title += (
            f"\n(the {n} clients it was built over; {outside} placed, left or not yet placed)"
            if len(plans) > 1 or run.summary.get("placements")
            else f"\n(clients in warm-up only; {outside} joined later)"
        )
    if skipped:
        title += f"\n{_layer_span(skipped)} clustered on their own tree: no cut line"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("client")
    ax.set_ylabel("merge distance")
    top = cut_height(tree, 1)
    ax.set_ylim(0, top * 1.05 if top > 0 else 1.0)
    return fig, heights


def plot_sharing_map(run: RunData) -> Figure | None:
    """Layers x clients map of cluster ids: clients with the same colour in a row share that layer's expert.

    Clients are in dendrogram leaf order when the run has a tree; layer 1 (nearest the input) is at
    the bottom, so the trunk is below the branches. None when the run did not record labels.
    """
    labels = run.labels
    if labels is None or labels.size == 0:
        return None
    n_layers, n = labels.shape
    order = leaf_order(run)
    grid = labels[:, order]
    fig = Figure(figsize=(max(5.0, 0.42 * n + 2.5), max(2.4, 0.42 * n_layers + 1.6)))
    ax = fig.add_subplot()
    big = grid.max() >= 10
    cmap = matplotlib.colormaps["tab20" if big else "tab10"].with_extremes(bad="#e6e6e6")
    shown = np.ma.masked_less(grid, 0)  # -1: a client not placed in any cluster
    ax.imshow(shown, cmap=cmap, vmin=0, vmax=19 if big else 9, origin="lower", aspect="auto")
    if n * n_layers <= 600:
        for i in range(n_layers):
            for j in range(n):
                text = str(grid[i, j]) if grid[i, j] >= 0 else "-"
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="black")
    # a client placed in the tree after it was built (federation.join): "3*r5", placed after round 5
    placed = {int(p["client"]): int(p["round"]) + 1 for p in run.summary.get("placements") or []}
    ticks = [f"{k}*r{placed[k]}" if k in placed else str(k) for k in order]
    ax.set_xticks(range(n), ticks, fontsize=8, rotation=90 if placed else 0)
    ax.set_yticks(range(n_layers), [str(layer + 1) for layer in range(n_layers)], fontsize=8)
    ax.set_xlabel(
        "client"
        + (" (tree order)" if run.tree is not None else "")
        + ("; k*rR: placed after round R" if placed else "")
    )
    ax.set_ylabel("layer (1 = input side)")
    cuts = [len({v for v in row.tolist() if v >= 0}) for row in labels]
    ax.set_title(f"Sharing map: cluster of each client per layer (clusters per layer: {cuts})", fontsize=10)
    return fig


def plot_ari(run: RunData) -> Figure | None:
    """Layers x hierarchy depths heatmap of the adjusted Rand index between each layer's sharing partition
    and the planted groups at each depth, values written in the cells, colours fixed to [-0.5, 1].

    Layer 1 (nearest the input) is at the bottom, as in the sharing map. None when the run has no
    planted groups or no sharing partition.
    """
    ari, levels = run.ari, run.planted_levels
    if ari is None or levels is None or ari.size == 0:
        return None
    n_layers, depth = ari.shape
    fig = Figure(figsize=(max(4.5, 1.5 * depth + 3.0), max(2.6, 0.42 * n_layers + 1.9)))
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="#e6e6e6")
    image = ax.imshow(np.ma.masked_invalid(ari), cmap=cmap, vmin=-0.5, vmax=1.0, origin="lower", aspect="auto")
    for i in range(n_layers):
        for j in range(depth):
            value = ari[i, j]
            ax.text(j, i, "-" if np.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=9)
    ticks = [
        f"depth {h + 1}\n({len(set(level))} group{'s' if len(set(level)) > 1 else ''})"
        for h, level in enumerate(levels)
    ]
    ax.set_xticks(range(depth), ticks, fontsize=8)
    ax.set_yticks(range(n_layers), [str(layer + 1) for layer in range(n_layers)], fontsize=8)
    ax.set_xlabel("planted hierarchy (depth 1: the first part of the group names)")
    ax.set_ylabel("layer (1 = input side)")
    fig.colorbar(image, ax=ax, label="adjusted Rand index")
    ax.set_title(
        "Did the sharing partition find the planted groups, and at which depth?\n"
        "ARI of each layer's clusters against the planted groups (1: found exactly, 0: chance)",
        fontsize=10,
    )
    return fig


# --- curves -------------------------------------------------------------------------------------------
def _client_style(client: int, num_clients: int) -> dict[str, Any]:
    """Thin line of one client, coloured as ``C{client}`` in every figure; labelled when there are few clients."""
    style: dict[str, Any] = {"color": f"C{client % 10}", "linewidth": 0.9, "alpha": 0.6, "marker": "."}
    if num_clients <= 10:
        style["label"] = f"client {client}"
    return style


def _shade_warmup(ax: Any, warmup: Sequence[int]) -> None:
    for i, r in enumerate(warmup):
        ax.axvspan(r + 0.5, r + 1.5, color="#bbbbbb", alpha=0.35, linewidth=0, label="warm-up" if i == 0 else None)


def plot_accuracy(run: RunData) -> Figure:
    """Each client's accuracy on its own validation split after every round (thin), their mean (bold),
    under the run's evaluation convention; the other convention's mean dashed; warm-up rounds shaded.
    Rounds on the x axis are 1-based."""
    acc = run.accuracy_matrix()  # (clients, rounds)
    rounds = np.arange(1, acc.shape[1] + 1)
    fig = Figure(figsize=(7.0, 4.0))
    ax = fig.add_subplot()
    _shade_warmup(ax, run.warmup_rounds)
    for k in range(acc.shape[0]):
        ax.plot(rounds, acc[k], **_client_style(k, acc.shape[0]), markersize=3)
    history = run.summary.history
    mean = np.asarray([np.nan if h.mean is None else h.mean for h in history], dtype=np.float64)
    ax.plot(rounds[: mean.size], mean, color="black", linewidth=2.2, marker="o", markersize=4, label="mean")
    other = run.evaluate.other
    values = [h.convention_mean(other) for h in history]
    if any(v is not None for v in values):
        other_mean = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
        ax.plot(rounds[: other_mean.size], other_mean, color="#555555", linewidth=1.4, linestyle="--",
                label=other.mean_label)  # fmt: skip
    best = run.summary.best_round
    if best is not None and 0 <= best < mean.size:
        ax.scatter([best + 1], [mean[best]], s=90, facecolors="none", edgecolors="#c44e52", zorder=5, label="best")
    federated = run.summary.best_federated_round
    if federated is not None and federated != best and 0 <= federated < mean.size:
        ax.scatter([federated + 1], [mean[federated]], s=90, marker="s", facecolors="none", edgecolors="#4c72b0",
                   zorder=5, label="best after warm-up")  # fmt: skip
    ax.set_xlabel("round")
    ax.set_ylabel(run.metric + " (own validation split)")
    ax.set_xticks(rounds if rounds.size <= 30 else rounds[:: max(1, rounds.size // 15)])
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(f"Per-client (thin) and mean (bold) {run.metric} of {run.evaluate.subject}, {acc.shape[0]} clients",
                 fontsize=10)  # fmt: skip
    return fig


def plot_lambdas(run: RunData) -> Figure | None:
    """Lambda (weight of the cluster expert; 1 - lambda goes to the external expert) per layer, one panel
    per target module: every client thin, the mean bold. None when the method has no lambda."""
    table = run.lambdas()
    if table is None:
        return None
    modules = list(dict.fromkeys(table.modules))
    init = (run.config.get(run.method) or {}).get("lambda_init", 0.5)
    fig = Figure(figsize=(max(5.0, 3.6 * len(modules)), 3.6))
    axes = fig.subplots(1, len(modules), sharey=True, squeeze=False)[0]
    for ax, module in zip(axes, modules, strict=True):
        m = table.module_matrix(module)  # (clients, layers)
        layers = np.arange(1, m.shape[1] + 1)
        for k in range(m.shape[0]):
            ax.plot(layers, m[k], **_client_style(k, m.shape[0]), markersize=4)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # layers shared by everyone have no lambda
            mean = np.nanmean(m, axis=0)
        ax.plot(layers, mean, color="black", linewidth=2.2, marker="o", markersize=4, label="mean")
        ax.axhline(float(init), color="#888888", linestyle=":", linewidth=1, label=f"initial {float(init):g}")
        ax.set_title(module, fontsize=10)
        ax.set_xlabel("layer (1 = input side)")
        ax.set_xticks(layers)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("lambda (cluster expert weight)")
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle("Learned lambda per layer: clients thin, mean bold", fontsize=10)
    return fig


def plot_label_counts(run: RunData) -> Figure | None:
    """Each client's training examples per label, stacked. None when the run has no partition record."""
    found = run.label_counts()
    if found is None:
        return None
    counts, names = found
    n = counts.shape[0]
    fig = Figure(figsize=(max(5.0, 0.4 * n + 3.0), 3.6))
    ax = fig.add_subplot()
    bottom = np.zeros(n)
    colors = [f"C{j % 10}" for j in range(counts.shape[1])]
    for j, name in enumerate(names):
        ax.bar(np.arange(n), counts[:, j], bottom=bottom, label=name, color=colors[j], width=0.8)
        bottom += counts[:, j]
    ax.set_xticks(range(n), [str(k) for k in range(n)], fontsize=8)
    ax.set_xlabel("client")
    ax.set_ylabel("training examples")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("Label counts per client (training split)", fontsize=10)
    return fig


def plot_communication(run: RunData) -> Figure:
    """Megabytes sent per client each round (mean over participating clients), up and down."""
    history = run.summary.history
    rounds = np.arange(1, len(history) + 1)
    up = np.asarray([h.uplink_mb for h in history])
    down = np.asarray([h.downlink_mb for h in history])
    fig = Figure(figsize=(7.0, 3.4))
    ax = fig.add_subplot()
    _shade_warmup(ax, run.warmup_rounds)
    width = 0.38
    ax.bar(rounds - width / 2, up, width, label="up (client to server)", color=UP_COLOR)
    ax.bar(rounds + width / 2, down, width, label="down (server to client)", color=DOWN_COLOR)
    ax.set_xlabel("round")
    ax.set_ylabel("MB per client")
    ax.set_xticks(rounds if rounds.size <= 30 else rounds[:: max(1, rounds.size // 15)])
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(f"Communication per round (total per client: up {up.sum():.3g} MB, down {down.sum():.3g} MB)")
    ax.title.set_fontsize(10)
    return fig


def plot_privacy(run: RunData) -> Figure | None:
    """With ``privacy`` on, the epsilon spent after each round at the run's delta: against the other
    clients (amplified by sampling) and against the server (the largest over clients), with the target
    epsilon where one was given; None when privacy was off or every epsilon is unbounded (no noise)."""
    privacy = run.summary.privacy
    history = run.summary.history
    if privacy is None or not any(h.epsilon is not None or h.epsilon_server is not None for h in history):
        return None
    rounds = np.arange(1, len(history) + 1)
    epsilon = np.asarray([np.nan if h.epsilon is None else h.epsilon for h in history], dtype=np.float64)
    server = np.asarray([np.nan if h.epsilon_server is None else h.epsilon_server for h in history], dtype=np.float64)
    fig = Figure(figsize=(7.0, 3.4))
    ax = fig.add_subplot()
    _shade_warmup(ax, run.warmup_rounds)
    ax.plot(rounds, epsilon, color="black", linewidth=2.0, marker="o", markersize=4,
            label="against the other clients")  # fmt: skip
    ax.plot(rounds, server, color="#c44e52", linewidth=1.4, linestyle="--", marker=".",
            label="against the server (largest over clients)")  # fmt: skip
    if privacy.target_epsilon is not None:
        ax.axhline(privacy.target_epsilon, color="#555555", linewidth=1.0, linestyle=":", label="target epsilon")
    ax.set_xlabel("round")
    ax.set_ylabel(f"epsilon at delta {privacy.delta:g}" if privacy.delta is not None else "epsilon")
    ax.set_xticks(rounds if rounds.size <= 30 else rounds[:: max(1, rounds.size // 15)])
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("Privacy spent after each round (client-level differential privacy)", fontsize=10)
    return fig


# --- comparisons ----------------------------------------------------------------------------------------
def plot_compare(table_rows: Sequence[Mapping[str, Any]], path: str | Path, metric: str = "accuracy") -> Path:
    """Grouped bar chart of methods per dataset, with standard deviations as error bars.

    Args:
        table_rows: dicts ``{"method": str, "dataset": str, "mean": float, "std": float | None}``
            (e.g. mean and std over seeds of the best mean accuracy); methods and datasets keep the
            order they first appear in.
        path: the PNG to write (parent folders are created).
        metric: what the means are (the y label says ``mean <metric>``).
    Returns:
        the path written.
    """
    if not table_rows:
        raise ValueError("plot_compare needs at least one row")
    datasets = list(dict.fromkeys(str(r["dataset"]) for r in table_rows))
    methods = list(dict.fromkeys(str(r["method"]) for r in table_rows))
    values = {(str(r["method"]), str(r["dataset"])): r for r in table_rows}
    width = 0.8 / len(methods)
    fig = Figure(figsize=(max(5.0, 1.2 + len(datasets) * (0.5 + 0.45 * len(methods))), 4.0))
    ax = fig.add_subplot()
    x = np.arange(len(datasets))
    for i, method in enumerate(methods):
        rows = [values.get((method, d)) for d in datasets]
        means = np.asarray([np.nan if r is None or r.get("mean") is None else float(r["mean"]) for r in rows])
        stds = np.asarray([0.0 if r is None or r.get("std") is None else float(r["std"]) for r in rows])
        offset = (i - (len(methods) - 1) / 2) * width
        bars = ax.bar(x + offset, means, width * 0.95, yerr=stds, capsize=3, label=method, color=f"C{i % 10}")
        ax.bar_label(bars, labels=["" if np.isnan(m) else f"{m:.3f}" for m in means], fontsize=7, padding=2)
    ax.set_xticks(x, datasets)
    ax.set_ylabel(f"mean {metric}")
    finite = [float(r["mean"]) for r in table_rows if r.get("mean") is not None]
    low = min(finite) if finite else 0.0
    ax.set_ylim(max(0.0, low - 0.1) if low > 0.2 else 0.0, 1.05 if not finite or max(finite) <= 1.0 else None)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(alpha=0.3, axis="y")
    ax.set_title("Methods compared (error bars: standard deviation)", fontsize=10)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(figure_png(fig))
    return out
