"""The outputs of ``fedtreelora compare``: ``table.md`` (the score, cost, paired-difference and ARI
tables), ``table.csv``, ``compare.json`` and ``compare.png``."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from fedtreelora.compare.stats import (
    ADDED_PREFIXES,
    AVERAGE,
    METRICS,
    PRIVACY_COLUMNS,
    REFERENCES,
    difference_key,
    is_marked,
)
from fedtreelora.runfolder import Convention

if TYPE_CHECKING:
    from fedtreelora.compare.runs import RunResult

ROUND_NAMES = {"best": "best round", "best_federated": "best federated round (after warm-up)", "final": "final round"}
"""A score's prefix -> how the paired tables' headings name its round."""

CONVENTIONS = {convention.value: convention.description for convention in Convention}
"""``federation.evaluate`` -> how table titles say what was scored (:attr:`Convention.description`)."""
MIXED = "mixed"
"""The convention of a table whose runs were scored under different ones."""


def convention_name(results: Sequence[RunResult]) -> str:
    """The evaluation convention of the runs' headline numbers (``received``, ``trained``, or ``mixed``;
    runs written before the setting existed scored after local training)."""
    names = {r.summary.evaluate.value for r in results}
    return names.pop() if len(names) == 1 else MIXED


METRIC_NAMES = {"accuracy": "accuracy", "rouge1": "ROUGE-1"}
"""A run's ``metric`` -> how tables name it."""


REFERENCE_NAMES = {"fedit": "FedIT", "local": "local"}
"""A reference method -> how headings name it."""


def metric_name(runs: Sequence[RunResult]) -> str:
    """How the table names the runs' metric (``accuracy``, ``ROUGE-1``; ``score`` when they differ)."""
    metrics = {r.summary.metric for r in runs}
    if len(metrics) != 1:
        return "score"
    (metric,) = metrics
    return METRIC_NAMES.get(metric, metric)


ARI_TITLE = "Did the sharing find the planted groups?"
"""The heading of the ARI section of ``table.md``."""
ARI_RULE = (
    "ARI: adjusted Rand index between a layer's sharing partition (the clients averaged together at that "
    "layer) and the planted groups at a depth: 1 = the layer's clusters are exactly the planted groups at "
    "that depth, 0 = no better than chance (e.g. everyone in one cluster, or every client alone), below 0 = "
    "worse than chance. Cells: mean ± sample std over seeds (0.00 with one seed); `(n=k)` where only k of "
    "the method's runs scored the cell, n/a where none did."
)
"""The line under the ARI section's heading that says how to read it."""


def ari_text(mean: float | None, std: float | None, n: int, runs: int) -> str:
    """An ARI cell: ``0.83 ± 0.12``, with ``(n=k)`` when only k of the row's ``runs`` scored it; ``n/a``
    when none did."""
    if mean is None or n == 0:
        return "n/a"
    return f"{mean:.2f} ± {0.0 if std is None else std:.2f}" + ("" if n == runs else f" (n={n})")


def render_ari_section(tables: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The markdown lines of "Did the sharing find the planted groups?" from :func:`ari_tables`: per
    dataset, the planted groups at each depth and one table per depth (rows: methods, columns: layers),
    then the rows left out for want of a sharing partition. No lines when ``tables`` is empty."""
    if not tables:
        return []
    lines = ["", f"## {ARI_TITLE}", "", ARI_RULE]
    for dataset, table in tables.items():
        depths = table["depths"]
        named = "; ".join(f"depth {h}: {', '.join(groups)}" for h, groups in enumerate(depths, start=1))
        lines += ["", f"### {dataset}"] + (["", f"Planted groups by depth ({named})."] if named else [])
        header = ["method", *(f"layer {i}" for i in range(1, table["layers"] + 1))]
        for h in range(len(depths) if table["methods"] else 0):
            body = []
            for method in table["methods"]:
                row = table["rows"][method]
                runs = len(row["seeds"])
                cells = [
                    ari_text(row["mean"][layer][h], row["std"][layer][h], row["n"][layer][h], runs)
                    for layer in range(table["layers"])
                ]
                body.append([method, *cells])
            title = f"depth {h + 1} ({len(depths[h])} group{'s' if len(depths[h]) != 1 else ''})"
            lines += ["", f"#### {title}", "", *_markdown_table(header, body)]
        if table["skipped"]:
            lines += ["", f"Not shown, no sharing partition to score: {', '.join(table['skipped'])}."]
    return lines


def _cell(mean: float, std: float) -> str:
    return "n/a" if math.isnan(mean) else f"{mean:.2f} ± {std:.2f}"


def _markdown_table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return lines


def render_markdown(rows: list[dict[str, Any]], datasets: Sequence[str], meta: dict[str, Any]) -> str:
    """``table.md``: a header on what was run, then the best-round, best-federated-round, final-round and
    cost tables, then the paired differences to each reference the rows carry
    (:func:`render_paired_section`), then, for datasets with planted groups, the ARI of the sharing
    partitions (``meta["ari"]``, :func:`render_ari_section`).

    ``datasets`` are the score columns' labels (datasets, or categories; ``meta["datasets"]`` names the
    datasets when they differ). The best mean of each score column is in bold.
    """
    labels = [*datasets, AVERAGE]
    seeds = meta["seeds"]
    metric = meta.get("metric", "accuracy")
    sourced = meta.get("datasets", datasets)
    per_category = list(sourced) != list(datasets)
    scope, split, over = (
        ("the category's clients", "test split", "categories")
        if per_category
        else ("clients", "validation set", "datasets")
    )
    lines = [
        f"# `fedtreelora compare`: suite {meta['suite']}",
        "",
        *([meta["description"], ""] if meta.get("description") else []),
        "- datasets: " + ", ".join(f"{d} ({meta['sources'][d]})" for d in sourced),
        f"- methods: {', '.join(r['method'] for r in rows)}",
        f"- seeds: {', '.join(str(s) for s in seeds)}",
        *([f"- overrides: {' '.join(meta['overrides'])}"] if meta.get("overrides") else []),
        f"- command: `{meta['command']}`",
        f"- machine: {meta['machine']}; finished {meta['finished']}",
        "",
        f"Cells: mean ± sample std over {len(seeds)} seed(s) (0.00 with one seed) of the mean personalized "
        f"{metric} over {scope}, each client on its own {split}, in %. Average: per seed, the mean over "
        f"{over}; then mean ± std over seeds. Best mean per column in bold.",
    ]
    for prefix, _, template in METRICS:
        evaluate = meta.get("evaluate")
        convention = (
            "runs scored under different conventions (federation.evaluate)"
            if evaluate == MIXED
            else Convention.of(evaluate).description
        )
        title = template.format(metric=metric, convention=convention)
        best = {
            label: max(
                (r[f"{label}_{prefix}_mean"] for r in rows if not math.isnan(r[f"{label}_{prefix}_mean"])),
                default=math.nan,
            )
            for label in labels
        }
        body = []
        for r in rows:
            cells = [r["method"]]
            for label in labels:
                mean, std = r[f"{label}_{prefix}_mean"], r[f"{label}_{prefix}_std"]
                text = _cell(mean, std)
                cells.append(f"**{text}**" if not math.isnan(mean) and mean == best[label] else text)
            body.append(cells)
        lines += ["", f"## {title}", "", *_markdown_table(["method", *labels], body)]
    cost_header = [
        "method",
        "trainable params / client",
        "trainable % of backbone",
        "uplink MB / client / round",
        "downlink MB / client / round",
        "run time (s, all runs)",
    ]
    cost_body = [
        [
            r["method"],
            f"{r['trainable_params_per_client']:,.0f}",
            f"{r['trainable_percent']:.3f}",
            f"{r['uplink_mb_per_client_per_round']:.3f}",
            f"{r['downlink_mb_per_client_per_round']:.3f}",
            f"{r['wall_seconds']:.0f}",
        ]
        for r in rows
    ]
    private = any("epsilon" in r for r in rows)
    if private:
        cost_header.append("epsilon (other clients / server)")
        for cells, r in zip(cost_body, rows, strict=True):
            cells.append(f"{_epsilon_cell(r.get('epsilon'))} / {_epsilon_cell(r.get('epsilon_server'))}")
    lines += [
        "",
        "## Cost (mean over datasets and seeds; communication averaged over all rounds, warm-up included)",
        "",
        *_markdown_table(cost_header, cost_body),
    ]
    if private:
        lines += ["", PRIVACY_NOTE]
    for reference in REFERENCES:
        if any(difference_key(reference, AVERAGE, "best", "mean") in r for r in rows):
            excluded = meta.get("paired_differences", {}).get(reference, {}).get("excluded", [])
            lines += render_paired_section(rows, labels, reference, metric, excluded)
    lines += render_ari_section(meta.get("ari") or {})
    return "\n".join(lines) + "\n"


PRIVACY_NOTE = (
    "epsilon: the final epsilon of client-level differential privacy (`privacy`, docs/privacy.md) at each "
    "run's delta, mean over the method's runs: against the other clients (amplified by sampling) / against "
    "the server (the largest over clients); `-` where its runs had privacy off, or no bound (noise "
    "multiplier 0)."
)
"""The line under the cost table of a comparison where some run had privacy on."""


def _epsilon_cell(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


MARK_RULE = (
    "`*`: |mean| > 2 standard errors (std / sqrt(n)) with n >= 2 pairs; with few seeds a rough screen, "
    "not a test at 5%."
)
"""The line under each paired table that states when a cell is marked."""


def difference_text(mean: float, std: float, n: int) -> str:
    """A paired cell: ``+1.23 ± 0.45 (n=3)``, ``*`` appended when :func:`is_marked`; ``n/a`` without pairs."""
    if n == 0 or math.isnan(mean):
        return "n/a"
    return f"{mean:+.2f} ± {std:.2f} (n={n})" + ("*" if is_marked(mean, std, n) else "")


def _excluded_line(excluded: Sequence[Mapping[str, Any]], name: str) -> list[str]:
    if not excluded:
        return []
    pairs = ", ".join(f"{e['method']} on {e['dataset']} seed {e['seed']}" for e in excluded)
    return ["", f"Left out (the run's partition differs from {name}'s at the same seed): {pairs}."]


def render_paired_section(
    rows: Sequence[Mapping[str, Any]],
    labels: Sequence[str],
    reference: str,
    metric: str,
    excluded: Sequence[Mapping[str, Any]] = (),
) -> list[str]:
    """The markdown lines of "Paired differences to <reference>": one table per score (best round, best
    federated round, final round) with the rows in the main table's order, read from the rows'
    :func:`difference_key` entries; the reference's own row is shown as ``—``."""
    name = REFERENCE_NAMES.get(reference, reference)
    lines = [
        "",
        f"## Paired differences to {name}",
        "",
        f"Per seed, the row's score minus {name}'s on the same partition, in points of {metric} (%); cells: "
        f"mean ± sample std of these differences over the seeds both ran (n pairs).",
    ]
    for prefix, _, _ in METRICS:
        title = ROUND_NAMES[prefix]
        body = []
        for r in rows:
            cells = [r["method"]]
            for label in labels:
                if r["method"] == reference:
                    cells.append("—")
                    continue
                mean, std, n = (r[difference_key(reference, label, prefix, stat)] for stat in ("mean", "std", "n"))
                cells.append(difference_text(mean, std, int(n)))
            body.append(cells)
        lines += ["", f"### {title}", "", *_markdown_table([f"method − {name}", *labels], body), "", MARK_RULE]
    return lines + _excluded_line(excluded, name)


def csv_columns(datasets: Sequence[str], references: Sequence[str] = REFERENCES) -> list[str]:
    """Column order of ``table.csv``: the best- and final-round scores, the cost, the paired differences
    of those two to each of ``references`` (those in the comparison; :func:`difference_key`), then the
    same for :data:`ADDED_PREFIXES` (the best federated round's scores, then its differences)."""
    labels = [*datasets, AVERAGE]

    def scores(prefixes: Sequence[str]) -> list[str]:
        return [f"{label}_{prefix}_{stat}" for prefix in prefixes for label in labels for stat in ("mean", "std")]

    def differences(prefixes: Sequence[str]) -> list[str]:
        return [
            difference_key(reference, label, prefix, stat)
            for reference in references
            for prefix in prefixes
            for label in labels
            for stat in ("mean", "std", "n")
        ]

    first = [prefix for prefix, _, _ in METRICS if prefix not in ADDED_PREFIXES]
    cost = [
        "seeds",
        "trainable_params_per_client",
        "trainable_percent",
        "uplink_mb_per_client_per_round",
        "downlink_mb_per_client_per_round",
        "wall_seconds",
    ]
    return ["method", *scores(first), *cost, *differences(first), *scores(ADDED_PREFIXES), *differences(ADDED_PREFIXES)]


def write_outputs(
    out: Path,
    rows: list[dict[str, Any]],
    runs: Sequence[RunResult],
    datasets: Sequence[str],
    meta: dict[str, Any],
    columns: Sequence[str] | None = None,
    references: Sequence[str] = (),
) -> dict[str, Path]:
    """Write ``table.md``, ``table.csv`` and ``compare.json``; returns their paths by name.

    ``columns`` are the score columns' labels (default: ``datasets``); ``references`` the methods whose
    paired differences the rows carry (:func:`difference_values`)."""
    labels = list(datasets) if columns is None else list(columns)
    out.mkdir(parents=True, exist_ok=True)
    files = {"table.md": out / "table.md", "table.csv": out / "table.csv", "compare.json": out / "compare.json"}
    files["table.md"].write_text(render_markdown(rows, labels, {**meta, "datasets": list(datasets)}))
    with files["table.csv"].open("w", newline="") as f:
        private = list(PRIVACY_COLUMNS) if any("epsilon" in r for r in rows) else []
        writer = csv.DictWriter(f, fieldnames=[*csv_columns(labels, references), *private])
        writer.writeheader()
        writer.writerows(rows)
    record = {
        **meta,
        "datasets": list(datasets),
        "columns": labels,
        "rows": rows,
        "runs": [
            {
                "dataset": r.spec.dataset,
                "method": r.spec.method,
                "seed": r.spec.seed,
                "folder": str(r.spec.folder.relative_to(out))
                if r.spec.folder.is_relative_to(out)
                else str(r.spec.folder),
                "best_mean": r.summary.best_mean,
                "final_mean": r.summary.final_mean,
                "best_round": r.summary.best_round,
                "best_federated_mean": r.summary.best_federated_mean,
                "best_federated_round": r.summary.best_federated_round,
                "wall_seconds": r.summary.wall_seconds,
                **(
                    {}
                    if (privacy := r.summary.privacy) is None
                    else {"epsilon": privacy.epsilon, "epsilon_server": privacy.epsilon_server}
                ),
                "status": r.status,
            }
            for r in runs
        ],
    }
    files["compare.json"].write_text(json.dumps(record, indent=2, allow_nan=True) + "\n")
    return files


def plot_rows(rows: list[dict[str, Any]], datasets: Sequence[str], prefix: str = "best") -> list[dict[str, Any]]:
    """The table in long form for :func:`fedtreelora.report.plot_compare`: one dict per (method, column
    or Average) with ``mean`` and ``std`` of the metric over seeds as fractions (not %)."""
    return [
        {
            "method": r["method"],
            "dataset": label,
            "mean": None if math.isnan(r[f"{label}_{prefix}_mean"]) else r[f"{label}_{prefix}_mean"] / 100.0,
            "std": None if math.isnan(r[f"{label}_{prefix}_std"]) else r[f"{label}_{prefix}_std"] / 100.0,
        }
        for r in rows
        for label in [*datasets, AVERAGE]
    ]


def _plot(
    rows: list[dict[str, Any]], datasets: Sequence[str], path: Path, console: Console, metric: str = "accuracy"
) -> bool:
    """Draw ``compare.png`` (best-round scores) with the report helper when it is installed; a failure
    to plot is reported and never fails the comparison."""
    try:
        from fedtreelora.report import plot_compare
    except ImportError:
        return False
    try:
        plot_compare(plot_rows(rows, datasets), path, metric)
    except Exception as exc:  # a plot must not cost the tables of a long comparison
        console.print(f"[yellow]compare.png not written: {type(exc).__name__}: {exc}[/]")
        return False
    return path.is_file()
