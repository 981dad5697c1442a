"""The numbers of ``fedtreelora compare``: mean ± sample std over seeds, the score columns and rows,
paired differences to a reference method with the 2-standard-error screen, the majority rate, and the
ARI tables of planted groups (see :mod:`fedtreelora.compare` for what each number means)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedtreelora.runfolder import PER_CLIENT_KEYS as PER_CLIENT_KEYS  # a score's key -> its per-client key
from fedtreelora.runfolder import RunSummary

if TYPE_CHECKING:
    from fedtreelora.compare.runs import RunResult

AVERAGE = "Average"
METRICS = (("best", "best_mean", "Mean personalized {metric} (%) at the best round (as the paper reports), {convention}"),
           ("best_federated", "best_federated_mean",
            "Mean personalized {metric} (%) at the best federated round (the best round after warm-up), {convention}"),
           ("final", "final_mean", "Mean personalized {metric} (%) at the final round, {convention}"))  # fmt: skip
"""(prefix, summary key, table title) of each score, in the order of the tables."""
ADDED_PREFIXES = ("best_federated",)
"""Scores added after ``table.csv`` had its first layout: their columns come after all the others, so
the earlier columns keep their places."""

REFERENCES = ("fedit", "local")
"""The reference rows of the paired-difference tables, in the order they are shown."""
PRIVACY_COLUMNS = ("epsilon", "epsilon_server")
"""The rows' privacy keys, present only in a comparison where some run had ``privacy`` on: each method's
final epsilon against the other clients and against the server (mean over its runs with a finite one;
NaN where none had privacy on, or none has a bound)."""

RunKey = tuple[str, str, int]
"""``(method or variant, dataset, seed)``: one run of a comparison."""


@dataclass(frozen=True)
class Column:
    """One score column of the table: a dataset, or one category of a dataset's clients."""

    label: str
    dataset: str
    category: str | None = None


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1) of ``values``; the std of a single value is 0.0."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def majority_rate(partition: Mapping[str, Any]) -> float:
    """What predicting each client's majority class scores: the mean over clients of the share of their
    most common validation label, from a run's partition record (``clients[i].val_label_counts``;
    clients without validation examples are left out)."""
    counts = [c["val_label_counts"] for c in partition["clients"]]
    return statistics.mean(max(c) / sum(c) for c in counts if sum(c))


def _score(summary: Mapping[str, Any], key: str, category: str | None = None) -> float:
    """The run's ``best_mean`` / ``best_federated_mean`` / ``final_mean`` in %, or that of one category's
    clients (their mean at that round; clients that never reported are left out); NaN where the run has
    none."""
    run = RunSummary(summary)
    if category is None:
        value = run.headline.score(key)
        return math.nan if value is None else 100.0 * value
    values = [
        v
        for v, c in zip(run.per_client_at(key), run.client_categories, strict=False)
        if c == category and v is not None
    ]
    return 100.0 * float(np.mean(values)) if values else math.nan


def table_columns(runs: Sequence[RunResult], datasets: Sequence[str]) -> list[Column]:
    """The score columns: per dataset one column, or one per client category when its runs report
    ``client_categories`` (labelled by the category alone when the table has one dataset)."""
    columns: list[Column] = []
    for dataset in datasets:
        categories: list[str] = []
        for r in runs:
            if r.spec.dataset == dataset:
                for category in r.summary.client_categories:
                    if category not in categories:  # several clients share a category
                        categories.append(category)
        if not categories:
            columns.append(Column(dataset, dataset))
            continue
        for category in categories:
            label = category if len(datasets) == 1 else f"{dataset}/{category}"
            columns.append(Column(label, dataset, category))
    return columns


def _per_round(values: Sequence[float]) -> float:
    """The mean over a run's rounds (NaN for a run without rounds)."""
    return float(np.mean(values)) if values else math.nan


def summarise(
    runs: Sequence[RunResult],
    datasets: Sequence[str],
    methods: Sequence[str],
    columns: Sequence[Column] | None = None,
) -> list[dict[str, Any]]:
    """One row per method (flat dict, the CSV row) from finished runs.

    Keys: ``method``; for each column label (``columns``, default :func:`table_columns`) + ``Average``
    and each score prefix of :data:`METRICS` (``best``, ``best_federated``, ``final``):
    ``{label}_{prefix}_mean`` and ``{label}_{prefix}_std`` (the metric in %, over seeds);
    ``seeds`` (how many); ``trainable_params_per_client``, ``trainable_percent``,
    ``uplink_mb_per_client_per_round``, ``downlink_mb_per_client_per_round``; ``wall_seconds`` (sum
    over the method's runs, as recorded by each run); and, only when some run had ``privacy`` on,
    :data:`PRIVACY_COLUMNS`.
    """
    by_key = {(r.spec.method, r.spec.dataset, r.spec.seed): r.summary for r in runs}
    columns = table_columns(runs, datasets) if columns is None else list(columns)
    private = any(r.summary.privacy is not None for r in runs)
    rows = []
    for method in methods:
        mine = [r for r in runs if r.spec.method == method]
        seeds = sorted({r.spec.seed for r in mine})
        row: dict[str, Any] = {"method": method}
        for prefix, key, _ in METRICS:
            per_seed_average = []
            for seed in seeds:
                values = [
                    _score(by_key[(method, c.dataset, seed)], key, c.category)
                    for c in columns
                    if (method, c.dataset, seed) in by_key
                ]
                per_seed_average.append(float(np.mean(values)) if len(values) == len(columns) else math.nan)
            for c in columns:
                values = [
                    _score(by_key[(method, c.dataset, s)], key, c.category)
                    for s in seeds
                    if (method, c.dataset, s) in by_key
                ]
                row[f"{c.label}_{prefix}_mean"], row[f"{c.label}_{prefix}_std"] = mean_std(values)
            row[f"{AVERAGE}_{prefix}_mean"], row[f"{AVERAGE}_{prefix}_std"] = mean_std(per_seed_average)
        summaries = [r.summary for r in mine]
        row["seeds"] = len(seeds)
        trainable = [_required(s.trainable_params_per_client) for s in summaries]
        row["trainable_params_per_client"] = float(np.mean(trainable))
        row["trainable_percent"] = float(
            np.mean([100.0 * t / _required(s.backbone_params) for t, s in zip(trainable, summaries, strict=True)])
        )
        row["uplink_mb_per_client_per_round"] = float(
            np.mean([_per_round([h.uplink_mb for h in s.history]) for s in summaries])
        )
        row["downlink_mb_per_client_per_round"] = float(
            np.mean([_per_round([h.downlink_mb for h in s.history]) for s in summaries])
        )
        row["wall_seconds"] = float(sum(s.wall_seconds or 0.0 for s in summaries))
        if private:
            records = [s.privacy for s in summaries if s.privacy is not None]
            row["epsilon"] = _finite_mean([p.epsilon for p in records])
            row["epsilon_server"] = _finite_mean([p.epsilon_server for p in records])
        rows.append(row)
    return rows


def _finite_mean(values: Sequence[float | None]) -> float:
    """The mean of the values that are not None (NaN when there are none)."""
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else math.nan


def _required(value: int | None) -> int:
    """A count every finished run records (a summary without it is not a finished run's)."""
    if value is None:
        raise KeyError("a run summary without its parameter counts")
    return value


def is_marked(mean: float, std: float, n: int) -> bool:
    """The marking rule of the paired tables: ``|mean| > 2 * std / sqrt(n)`` with ``n >= 2`` pairs."""
    return n >= 2 and abs(mean) > 2.0 * std / math.sqrt(n)


def _same_partition(partitions: Mapping[RunKey, str] | None, a: RunKey, b: RunKey) -> bool:
    """False only when both runs' partitions are known and differ."""
    if partitions is None or a not in partitions or b not in partitions:
        return True
    return partitions[a] == partitions[b]


def _paired_seeds(
    by_key: Mapping[RunKey, Any], method: str, reference: str, dataset: str, partitions: Mapping[RunKey, str] | None
) -> tuple[list[int], list[int]]:
    """The seeds at which ``method`` and ``reference`` both ran ``dataset``, split into usable pairs and
    pairs left out because the two runs' partitions differ."""
    seeds = sorted(s for (m, d, s) in by_key if m == method and d == dataset and (reference, dataset, s) in by_key)
    usable: list[int] = []
    excluded: list[int] = []
    for seed in seeds:
        same = _same_partition(partitions, (method, dataset, seed), (reference, dataset, seed))
        (usable if same else excluded).append(seed)
    return usable, excluded


def difference_cell(by_seed: Mapping[int, float]) -> dict[str, Any]:
    """One cell of a paired table from its per-seed differences (points): ``mean``, ``std`` (ddof=1, as
    :func:`mean_std`), ``n`` (pairs), ``marked`` (:func:`is_marked`), ``seeds`` and ``differences``."""
    seeds = sorted(by_seed)
    differences = [by_seed[s] for s in seeds]
    mean, std = mean_std(differences)
    return {
        "mean": mean,
        "std": std,
        "n": len(seeds),
        "marked": is_marked(mean, std, len(seeds)),
        "seeds": seeds,
        "differences": differences,
    }


def _row_differences(
    by_key: Mapping[RunKey, Mapping[str, Any]],
    method: str,
    reference: str,
    columns: Sequence[Column],
    key: str,
    usable: Mapping[str, list[int]],
) -> dict[str, dict[str, Any]]:
    """Column label (and ``Average``) -> cell for one method against ``reference``; ``Average`` pairs the
    per-seed means over the columns, at the seeds where every column has a usable pair."""
    per_column: dict[str, dict[int, float]] = {}
    for c in columns:
        per_column[c.label] = {
            seed: _score(by_key[(method, c.dataset, seed)], key, c.category)
            - _score(by_key[(reference, c.dataset, seed)], key, c.category)
            for seed in usable[c.dataset]
        }
    common = set.intersection(*(set(d) for d in per_column.values())) if per_column else set()
    average = {seed: float(np.mean([d[seed] for d in per_column.values()])) for seed in common}
    return {label: difference_cell(d) for label, d in [*per_column.items(), (AVERAGE, average)]}


def paired_differences(
    runs: Sequence[RunResult],
    methods: Sequence[str],
    columns: Sequence[Column],
    reference: str,
    partitions: Mapping[RunKey, str] | None = None,
) -> dict[str, Any]:
    """Per-seed differences ``score(method) - score(reference)`` in points, paired on (dataset, seed).

    Every method of one (dataset, seed) is meant to see the same partition, so the pairing removes the
    partition's share of the seed noise. A pair is used when both runs exist and, where ``partitions``
    (:func:`read_partitions`) knows both, their partitions are equal; a missing seed reduces ``n``.

    Returns ``{"reference", "excluded": [{"method", "dataset", "seed"}, ...], "best": {method: {label:
    cell}}, "best_federated": {...}, "final": {...}}`` with the score columns' labels and ``Average`` as
    labels and cells as :func:`difference_cell`; one entry per score of the main tables (:data:`METRICS`).
    The reference's own row is all zeros.
    """
    by_key = {(r.spec.method, r.spec.dataset, r.spec.seed): r.summary for r in runs}
    datasets = list(dict.fromkeys(c.dataset for c in columns))
    result: dict[str, Any] = {"reference": reference, "excluded": []}
    usable: dict[str, dict[str, list[int]]] = {}
    for method in methods:
        usable[method] = {}
        for dataset in datasets:
            usable[method][dataset], excluded = _paired_seeds(by_key, method, reference, dataset, partitions)
            result["excluded"] += [{"method": method, "dataset": dataset, "seed": s} for s in excluded]
    for prefix, key, _ in METRICS:
        result[prefix] = {m: _row_differences(by_key, m, reference, columns, key, usable[m]) for m in methods}
    return result


def paired_tables(
    runs: Sequence[RunResult],
    methods: Sequence[str],
    columns: Sequence[Column],
    partitions: Mapping[RunKey, str] | None = None,
) -> dict[str, dict[str, Any]]:
    """:func:`paired_differences` against each of :data:`REFERENCES` that is among ``methods``."""
    return {ref: paired_differences(runs, methods, columns, ref, partitions) for ref in REFERENCES if ref in methods}


def difference_key(reference: str, label: str, prefix: str, stat: str) -> str:
    """The row / CSV key of a paired difference:
    ``diff_<reference>_<label>_<best|best_federated|final>_<mean|std|n>``."""
    return f"diff_{reference}_{label}_{prefix}_{stat}"


def difference_values(tables: Mapping[str, Mapping[str, Any]], method: str) -> dict[str, float | int]:
    """The flat row entries (:func:`difference_key`) of ``method`` in ``tables`` (:func:`paired_tables`)."""
    values: dict[str, float | int] = {}
    for reference, table in tables.items():
        for prefix, _, _ in METRICS:
            for label, cell in table[prefix][method].items():
                for stat in ("mean", "std", "n"):
                    values[difference_key(reference, label, prefix, stat)] = cell[stat]
    return values


def depth_groups(levels: Sequence[Sequence[str]]) -> list[list[str]]:
    """The distinct group prefixes at each depth of a summary's ``planted_levels``, in client order."""
    return [list(dict.fromkeys(level)) for level in levels]


def _ari_cells(values: Sequence[Sequence[Sequence[float | None]]], layers: int, depths: int) -> dict[str, Any]:
    """Mean, sample std and count over runs of each (layer, depth) cell; null cells are left out, and a
    cell no run scored is None in ``mean`` and ``std``."""
    stats: dict[str, Any] = {"mean": [], "std": [], "n": []}
    for layer in range(layers):
        means, stds, counts = [], [], []
        for depth in range(depths):
            cell = [
                float(score)
                for v in values
                if layer < len(v) and depth < len(v[layer]) and (score := v[layer][depth]) is not None
            ]
            cell = [x for x in cell if not math.isnan(x)]
            mean, std = mean_std(cell)
            means.append(None if math.isnan(mean) else mean)
            stds.append(None if math.isnan(std) else std)
            counts.append(len(cell))
        stats["mean"].append(means)
        stats["std"].append(stds)
        stats["n"].append(counts)
    return stats


def ari_tables(summaries: Mapping[RunKey, Mapping[str, Any]], methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The ARI of each layer's sharing partition against the planted groups, per dataset with planted
    structure, over seeds.

    Args:
        summaries: ``(method, dataset, seed)`` -> the run's summary; a dataset is included when one of
            its runs records ``ari`` (a layers x depths list, None for a method without a sharing
            partition).
        methods: the rows, in the main table's order.
    Returns:
        dataset -> ``{"depths": [[group prefix, ...] per depth] (:func:`depth_groups`), "layers": L,
        "methods": [shown rows], "skipped": [rows whose runs record no sharing partition], "rows":
        {method: {"seeds": [...], "mean", "std", "n": L x depths lists}} (None where no run scored a
        cell), "runs": [{"method", "seed", "ari"}] (every run's values as recorded)}``.
    """
    runs = {key: RunSummary(s) for key, s in summaries.items()}
    datasets = list(dict.fromkeys(d for (_, d, _), s in runs.items() if s.has_ari))
    tables: dict[str, dict[str, Any]] = {}
    for dataset in datasets:
        mine = {(m, seed): s.ari for (m, d, seed), s in runs.items() if d == dataset and s.has_ari}
        levels: Sequence[Sequence[str]] = next(
            (s.planted_levels for (_, d, _), s in runs.items() if d == dataset and s.has_ari and s.planted_levels),
            [],
        )
        scored = [a for a in mine.values() if a is not None]
        layers = max((len(a) for a in scored), default=0)
        depths = max([len(levels), *(len(row) for a in scored for row in a)])
        table: dict[str, Any] = {
            "depths": depth_groups(levels),
            "layers": layers,
            "methods": [],
            "skipped": [],
            "rows": {},
            "runs": [],
        }
        for method in methods:
            by_seed = sorted((seed, ari) for (m, seed), ari in mine.items() if m == method)
            if not by_seed:
                continue
            table["runs"] += [{"method": method, "seed": seed, "ari": ari} for seed, ari in by_seed]
            values = [ari for _, ari in by_seed if ari is not None]
            if not values:
                table["skipped"].append(method)
                continue
            table["methods"].append(method)
            seeds = [seed for seed, ari in by_seed if ari is not None]
            table["rows"][method] = {"seeds": seeds, **_ari_cells(values, layers, depths)}
        tables[dataset] = table
    return tables
