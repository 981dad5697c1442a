"""``fedtreelora compare``: every (method, dataset, seed) of a suite, on the same partitions, into one table.

Layout of the output folder ``DIR``::

    DIR/runs/<dataset>/<method>/seed<seed>/   one run folder each (see :mod:`fedtreelora.runfolder`)
    DIR/table.md                              the tables (best round, best federated round, final
                                              round, cost, paired differences), human-readable
    DIR/table.csv                             the same numbers, one row per method, full precision
    DIR/compare.json                          what was compared (suite, methods, seeds, overrides), the
                                              rows, the paired differences per seed, every run's
                                              headline numbers, and (planted groups) every run's ARI
    DIR/compare.png                           a plot, when the report helper is installed

Reuse: a run whose folder holds a finished summary and a config equal to the run's resolved config
(compared after validating it with today's schema, and ignoring the option sections of the *other*
methods) is read back instead of run again; a run with a matching config but no summary (an interrupted
run) resumes from its last checkpoint; a run whose config differs is deleted and run again.

Numbers: a run's score is the mean personalized metric over clients (each client on its own
validation set; accuracy for classification, ROUGE-1 for generation) at the best round (``best_mean``,
what the paper reports, possibly a warm-up round before anything is shared), at the best federated
round (``best_federated_mean``: the best round after warm-up; every round for a method without
warm-up) and at the final round (``final_mean``). A run folder written before the best federated round
was recorded gets it from its history (:func:`fedtreelora.headline.complete_summary`). A cell is the
mean +- sample standard deviation (ddof=1) over seeds, in percent; with one seed the std is shown as
0.00 (n/a where no run has the score, e.g. every run ended in warm-up).

Columns: one per dataset; a dataset whose runs report client categories (instruction tuning, e.g. the
``nlg`` suites) gets one column per category instead (the paper's NLG table: Text Edit, Struct2Text,
Sentiment, Reasoning), each the mean over that category's clients, taken at the run's best round,
best federated round (each chosen by the mean over all clients) or final round. ``Average`` is, per seed, the mean over
the columns, then mean +- std over seeds. Cost columns are means over every run of the method: trainable parameters per client (and
as % of the backbone), and uplink/downlink MB per client per round (mean over all rounds, warm-up
rounds included).

Paired differences: every row of one (dataset, seed) sees the same partition, so a row is compared with
a reference (``fedit`` and ``local``, each when it is in the comparison) seed by seed: per column, the
differences ``score(row, seed) - score(reference, seed)`` in points over the seeds both ran, as mean +-
sample std (ddof=1) and the number of pairs n. A pair whose runs' partition records differ is left out
and listed. ``Average`` pairs the per-seed means over the columns. A cell is marked ``*`` when
``|mean| > 2 * std / sqrt(n)`` with n >= 2. ``table.csv`` has them as
``diff_<reference>_<column>_<best|best_federated|final>_<mean|std|n>``; the best federated round's
score and difference columns come last.

Planted groups: for a dataset built from ``data.groups`` the runs record ``ari`` (a layers x depths
adjusted Rand index of each layer's sharing partition against the planted groups at each depth of the
hierarchy; None for a method without a sharing partition). ``table.md`` then ends with "Did the sharing
find the planted groups?": per such dataset one table per depth, rows the methods (those without a
sharing partition named below it), columns the layers, cells mean +- sample std over seeds;
``compare.json`` holds the same under ``ari``, with every run's values.
"""

from __future__ import annotations

import csv
import datetime as dt
import gc
import json
import math
import platform
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rich.console import Console

from fedtreelora.config import ConfigError, ExperimentBase, ExperimentConfig
from fedtreelora.data.groups import configured_dataset_name
from fedtreelora.headline import FEDERATED_KEYS, complete_summary
from fedtreelora.progress import progress_bars
from fedtreelora.runfolder import RunFolder
from fedtreelora.suites import Suite, check_same_partition

AVERAGE = "Average"
METRICS = (("best", "best_mean", "Mean personalized {metric} (%) at the best round (as the paper reports), {convention}"),
           ("best_federated", "best_federated_mean",
            "Mean personalized {metric} (%) at the best federated round (the best round after warm-up), {convention}"),
           ("final", "final_mean", "Mean personalized {metric} (%) at the final round, {convention}"))  # fmt: skip
"""(prefix, summary key, table title) of each score, in the order of the tables."""
ADDED_PREFIXES = ("best_federated",)
"""Scores added after ``table.csv`` had its first layout: their columns come after all the others, so
the earlier columns keep their places."""
ROUND_NAMES = {"best": "best round", "best_federated": "best federated round (after warm-up)", "final": "final round"}
"""A score's prefix -> how the paired tables' headings name its round."""
PER_CLIENT_KEYS = {
    "best_mean": "per_client_best_round",
    "best_federated_mean": "per_client_best_federated_round",
    "final_mean": "per_client",
}
"""A score's summary key -> the summary key of each client's score at that round (category columns)."""
CONVENTIONS = {
    "received": "scored on the model each client receives after aggregation (the papers' convention)",
    "trained": "scored right after each client's local training, before aggregation",
}
"""``federation.evaluate`` -> how table titles say what was scored."""


def convention_name(results: Sequence[RunResult]) -> str:
    """The evaluation convention of the runs' headline numbers (``received``, ``trained``, or ``mixed``;
    runs written before the setting existed scored after local training)."""
    names = {str(r.summary.get("evaluate", "trained")) for r in results}
    return names.pop() if len(names) == 1 else "mixed"


METRIC_NAMES = {"accuracy": "accuracy", "rouge1": "ROUGE-1"}
"""A run's ``metric`` -> how tables name it."""


@dataclass(frozen=True)
class Column:
    """One score column of the table: a dataset, or one category of a dataset's clients."""

    label: str
    dataset: str
    category: str | None = None


@dataclass(frozen=True)
class RunSpec:
    """One run of a comparison."""

    dataset: str
    method: str
    seed: int
    config: ExperimentConfig
    folder: Path


@dataclass
class RunResult:
    """A finished run: its summary, how it was obtained, and the seconds spent on it now."""

    spec: RunSpec
    summary: dict[str, Any]
    status: str
    """``reused`` (read back), ``resumed`` (from a checkpoint), ``new``, or ``rerun`` (its folder held a
    run of another config, deleted first)."""
    seconds: float

    @property
    def reused(self) -> bool:
        """True when read back from an earlier invocation."""
        return self.status == "reused"


@dataclass
class CompareResult:
    """What :func:`run_compare` did and produced."""

    out: Path
    datasets: list[str]
    methods: list[str]
    seeds: list[int]
    runs: list[RunResult]
    rows: list[dict[str, Any]]
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def executed(self) -> list[RunResult]:
        """Runs trained by this invocation (fresh or resumed)."""
        return [r for r in self.runs if not r.reused]

    @property
    def reused(self) -> list[RunResult]:
        """Runs read back from an earlier invocation."""
        return [r for r in self.runs if r.reused]


# ----------------------------------------------------------------------------------------------
# planning and reuse
# ----------------------------------------------------------------------------------------------


def run_folder(out: str | Path, dataset: str, method: str, seed: int) -> Path:
    """``out/runs/<dataset>/<method>/seed<seed>``."""
    return Path(out) / "runs" / dataset / method / f"seed{seed}"


def _pick(requested: Sequence[str] | None, available: list[str], what: str) -> list[str]:
    if requested is None:
        return available
    unknown = [x for x in requested if x not in available]
    if unknown:
        raise ConfigError(f"unknown {what} {unknown}; the suite has {available}")
    return list(dict.fromkeys(requested))


def plan_runs(
    suite: Suite,
    out: str | Path,
    *,
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    datasets: Sequence[str] | None = None,
    overrides: Sequence[str] = (),
) -> list[RunSpec]:
    """Every (dataset, seed, method) run with its validated config, datasets outermost.

    Raises :class:`ConfigError` for an unknown method or dataset, an invalid config, or methods of one
    (dataset, seed) that would not see the same partition (different ``data`` sections).
    """
    methods = suite.default_methods() if methods is None else list(dict.fromkeys(methods))
    suite.check_methods(methods)
    suite.check_methods(list(suite.method_overrides))  # a misspelt override must not pass silently
    if not methods:
        raise ConfigError("no methods to compare")
    seeds = list(suite.seeds) if seeds is None else list(dict.fromkeys(seeds))
    if not seeds:
        raise ConfigError("no seeds to run")
    labels = _pick(datasets, list(suite.datasets), "dataset(s)")
    specs: list[RunSpec] = []
    for dataset in labels:
        for seed in seeds:
            configs = [suite.resolve(m, dataset, seed, list(overrides)) for m in methods]
            # The partition is a function of the data section and the seed only: equal sections,
            # equal partitions for every method of this (dataset, seed).
            check_same_partition(configs, f"dataset {dataset!r}, seed {seed}")
            # A row is a method or a suite variant (a method with its own overrides): runs are named by row.
            specs.extend(
                RunSpec(dataset, row, seed, cfg, run_folder(out, dataset, row, seed))
                for row, cfg in zip(methods, configs, strict=True)
            )
    return specs


def comparable(config: ExperimentConfig) -> dict[str, Any]:
    """The parts of a config that affect its run: everything but the option sections of other methods
    (so registering a new method, or tuning one, does not invalidate the other methods' runs)."""
    data = config.model_dump(mode="json")
    keep = set(ExperimentBase.model_fields) | {config.method}
    return {k: v for k, v in data.items() if k in keep}


def stored_config_matches(folder: Path, config: ExperimentConfig) -> bool:
    """True when the config stored in ``folder`` validates today and equals ``config`` where it matters."""
    run = RunFolder(folder)
    if not run.config.is_file():
        return False
    try:
        stored = run.read_config()
    except (ConfigError, ValueError, yaml.YAMLError):
        return False
    return comparable(stored) == comparable(config)


def _read_summary(folder: Path) -> dict[str, Any] | None:
    """The summary of a finished run in ``folder``; None when it has none or it lacks the headline. A
    summary written before the best federated round was recorded gets it from its history and metrics
    (:func:`fedtreelora.headline.complete_summary`)."""
    run = RunFolder(folder)
    summary = run.read_summary()
    if summary is None or "best_mean" not in summary:
        return None
    return complete_summary(summary, None if FEDERATED_KEYS[0] in summary else run.read_metrics())


def execute_run(spec: RunSpec) -> RunResult:
    """Reuse, resume or (re)run one run (see the module docstring)."""
    start = time.perf_counter()
    matches = stored_config_matches(spec.folder, spec.config)
    status = "resumed" if matches else "new"
    if matches:
        summary = _read_summary(spec.folder)
        if summary is not None:
            return RunResult(spec, summary, "reused", time.perf_counter() - start)
        if not RunFolder(spec.folder).has_checkpoint():
            status = "new"
    elif spec.folder.exists():
        shutil.rmtree(spec.folder)  # a run of another config: start clean (no stale checkpoints)
        status = "rerun"
    from fedtreelora.engines import SimulationEngine  # heavy imports only when something runs

    summary = SimulationEngine(spec.config, spec.folder, quiet=True, resume=matches).run()
    gc.collect()
    return RunResult(spec, summary, status, time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------
# numbers
# ----------------------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1) of ``values``; the std of a single value is 0.0."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def _score(summary: dict[str, Any], key: str, category: str | None = None) -> float:
    """The run's ``best_mean`` / ``best_federated_mean`` / ``final_mean`` in %, or that of one category's
    clients (their mean at that round; clients that never reported are left out); NaN where the run has
    none."""
    if category is None:
        value = summary.get(key)
        return math.nan if value is None else 100.0 * float(value)
    per_client = summary.get(PER_CLIENT_KEYS[key]) or []
    values = [
        float(v)
        for v, c in zip(per_client, summary.get("client_categories") or [], strict=False)
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
                for category in r.summary.get("client_categories") or []:
                    if category not in categories:  # several clients share a category
                        categories.append(category)
        if not categories:
            columns.append(Column(dataset, dataset))
            continue
        for category in categories:
            label = category if len(datasets) == 1 else f"{dataset}/{category}"
            columns.append(Column(label, dataset, category))
    return columns


def metric_name(runs: Sequence[RunResult]) -> str:
    """How the table names the runs' metric (``accuracy``, ``ROUGE-1``; ``score`` when they differ)."""
    metrics = {str(r.summary.get("metric", "accuracy")) for r in runs}
    if len(metrics) != 1:
        return "score"
    (metric,) = metrics
    return METRIC_NAMES.get(metric, metric)


def _round_mean(summary: dict[str, Any], key: str) -> float:
    values = [h.get(key) or 0.0 for h in summary.get("history", [])]
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
    over the method's runs, as recorded by each run).
    """
    by_key = {(r.spec.method, r.spec.dataset, r.spec.seed): r.summary for r in runs}
    columns = table_columns(runs, datasets) if columns is None else list(columns)
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
        row["trainable_params_per_client"] = float(np.mean([s["trainable_params_per_client"] for s in summaries]))
        row["trainable_percent"] = float(
            np.mean([100.0 * s["trainable_params_per_client"] / s["backbone_params"] for s in summaries])
        )
        row["uplink_mb_per_client_per_round"] = float(
            np.mean([_round_mean(s, "uplink_mb_per_client") for s in summaries])
        )
        row["downlink_mb_per_client_per_round"] = float(
            np.mean([_round_mean(s, "downlink_mb_per_client") for s in summaries])
        )
        row["wall_seconds"] = float(sum(s.get("wall_seconds", 0.0) for s in summaries))
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# paired differences to a reference method
# ----------------------------------------------------------------------------------------------

REFERENCES = ("fedit", "local")
"""The reference rows of the paired-difference tables, in the order they are shown."""
REFERENCE_NAMES = {"fedit": "FedIT", "local": "local"}
"""A reference method -> how headings name it."""

RunKey = tuple[str, str, int]
"""``(method or variant, dataset, seed)``: one run of a comparison."""


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
    by_key: Mapping[RunKey, dict[str, Any]],
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


# ----------------------------------------------------------------------------------------------
# planted structure: did the sharing find the planted groups?
# ----------------------------------------------------------------------------------------------

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
    datasets = list(dict.fromkeys(d for (_, d, _), s in summaries.items() if "ari" in s))
    tables: dict[str, dict[str, Any]] = {}
    for dataset in datasets:
        mine = {(m, seed): s for (m, d, seed), s in summaries.items() if d == dataset and "ari" in s}
        levels: Sequence[Sequence[str]] = next(
            (s["planted_levels"] for s in mine.values() if s.get("planted_levels")), []
        )
        scored = [s["ari"] for s in mine.values() if s["ari"] is not None]
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
            runs = sorted((seed, s["ari"]) for (m, seed), s in mine.items() if m == method)
            if not runs:
                continue
            table["runs"] += [{"method": method, "seed": seed, "ari": ari} for seed, ari in runs]
            values = [ari for _, ari in runs if ari is not None]
            if not values:
                table["skipped"].append(method)
                continue
            table["methods"].append(method)
            seeds = [seed for seed, ari in runs if ari is not None]
            table["rows"][method] = {"seeds": seeds, **_ari_cells(values, layers, depths)}
        tables[dataset] = table
    return tables


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


# ----------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------


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
        evaluate = meta.get("evaluate", "trained")
        convention = CONVENTIONS.get(evaluate, "runs scored under different conventions (federation.evaluate)")
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
    lines += [
        "",
        "## Cost (mean over datasets and seeds; communication averaged over all rounds, warm-up included)",
        "",
        *_markdown_table(cost_header, cost_body),
    ]
    for reference in REFERENCES:
        if any(difference_key(reference, AVERAGE, "best", "mean") in r for r in rows):
            excluded = meta.get("paired_differences", {}).get(reference, {}).get("excluded", [])
            lines += render_paired_section(rows, labels, reference, metric, excluded)
    lines += render_ari_section(meta.get("ari") or {})
    return "\n".join(lines) + "\n"


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
        writer = csv.DictWriter(f, fieldnames=csv_columns(labels, references))
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
                "best_mean": r.summary.get("best_mean"),
                "final_mean": r.summary.get("final_mean"),
                "best_round": r.summary.get("best_round"),
                "best_federated_mean": r.summary.get("best_federated_mean"),
                "best_federated_round": r.summary.get("best_federated_round"),
                "wall_seconds": r.summary.get("wall_seconds"),
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


# ----------------------------------------------------------------------------------------------
# the whole comparison
# ----------------------------------------------------------------------------------------------


def _run_line(index: int, total: int, result: RunResult) -> str:
    s, spec = result.summary, result.spec
    best, final = _score(s, "best_mean"), _score(s, "final_mean")
    federated, federated_round = _score(s, "best_federated_mean"), s.get("best_federated_round")
    after = "-" if federated_round is None else f"{federated:6.2f} (round {int(federated_round) + 1})"
    if result.reused:
        how = f"reused (ran {s.get('wall_seconds', 0.0):.1f} s)"
    else:
        how = f"{result.seconds:.1f} s" + ("" if result.status == "new" else f" ({result.status})")
    return (
        f"[{index}/{total}] {spec.dataset:<12} {spec.method:<12} seed {spec.seed}: best {best:6.2f} "
        f"(round {int(s.get('best_round', -1)) + 1}), best federated {after}, final {final:6.2f}  {how}"
    )


def run_compare(
    suite: Suite,
    out: str | Path,
    *,
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    datasets: Sequence[str] | None = None,
    overrides: Sequence[str] = (),
    quiet: bool = False,
    console: Console | None = None,
    command: str = "",
    on_run: Callable[[RunResult], None] | None = None,
) -> CompareResult:
    """Run (or reuse) every (dataset, seed, method) of ``suite`` and write the tables under ``out``.

    Args:
        suite: the loaded suite.
        out: output folder (created).
        methods, seeds, datasets: subsets / replacements of the suite's defaults (None: the suite's).
        overrides: ``key=value`` assignments applied to every run after the suite's own settings.
        quiet: no progress bar (one line per run is still printed).
        console: where lines go (default: stderr).
        command: the command line, recorded in ``table.md``.
        on_run: called after each run (tests, custom progress).
    """
    out = Path(out)
    console = console or Console(stderr=True)
    specs = plan_runs(suite, out, methods=methods, seeds=seeds, datasets=datasets, overrides=overrides)
    labels = list(dict.fromkeys(s.dataset for s in specs))
    method_list = list(dict.fromkeys(s.method for s in specs))
    seed_list = list(dict.fromkeys(s.seed for s in specs))
    console.print(
        f"[bold]compare[/] suite {suite.name}: {len(method_list)} method(s) x {len(labels)} dataset(s) x "
        f"{len(seed_list)} seed(s) = {len(specs)} runs -> {out}",
        soft_wrap=True,
    )
    results: list[RunResult] = []
    progress = progress_bars(console, quiet=quiet)
    with progress:
        task = progress.add_task("runs", total=len(specs))
        for i, spec in enumerate(specs, start=1):
            progress.update(task, description=f"{spec.dataset} {spec.method} seed {spec.seed}")
            result = execute_run(spec)
            results.append(result)
            progress.console.print(_run_line(i, len(specs), result), soft_wrap=True, highlight=False)
            progress.advance(task)
            if on_run is not None:
                on_run(result)
    columns = table_columns(results, labels)
    rows = summarise(results, labels, method_list, columns)
    paired = paired_tables(results, method_list, columns, read_partitions(results))
    for row in rows:
        row.update(difference_values(paired, row["method"]))
    mismatched = partition_mismatches(results)
    for message in mismatched:
        console.print(f"[red]partition mismatch: {message}[/]")
    meta: dict[str, Any] = {
        "suite": suite.name,
        "suite_file": None if suite.path is None else str(suite.path),
        "description": suite.description,
        "sources": {d: _source(results_config(specs, d)) for d in labels},
        "methods": method_list,
        "seeds": seed_list,
        "overrides": list(overrides),
        "command": command or f"fedtreelora compare --suite {suite.name} --out {out}",
        "machine": f"{platform.node() or 'unknown host'} ({platform.machine()}, {_device_name(specs)})",
        "finished": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "runs_executed": sum(not r.reused for r in results),
        "runs_reused": sum(r.reused for r in results),
        "partition_mismatches": mismatched,
        "paired_differences": paired,
        "metric": metric_name(results),
        "evaluate": convention_name(results),
        "ari": ari_tables({(r.spec.method, r.spec.dataset, r.spec.seed): r.summary for r in results}, method_list),
    }
    column_labels = [c.label for c in columns]
    files = write_outputs(out, rows, results, labels, meta, column_labels, list(paired))
    if _plot(rows, column_labels, out / "compare.png", console, meta["metric"]):
        files["compare.png"] = out / "compare.png"
    return CompareResult(out, labels, method_list, seed_list, results, rows, files)


def read_partitions(results: Sequence[RunResult]) -> dict[RunKey, str]:
    """Each run's partition record as written (``(missing)`` when it has none), by (method, dataset, seed)."""
    texts = {}
    for r in results:
        text = RunFolder(r.spec.folder).read_partition_text()
        texts[(r.spec.method, r.spec.dataset, r.spec.seed)] = "(missing)" if text is None else text
    return texts


def partition_mismatches(results: Sequence[RunResult]) -> list[str]:
    """Check on disk that every method of one (dataset, seed) trained on the same clients: the runs'
    partition records must be identical. Returns one message per (dataset, seed) that differs."""
    groups: dict[tuple[str, int], dict[str, str]] = {}
    for (method, dataset, seed), text in read_partitions(results).items():
        groups.setdefault((dataset, seed), {})[method] = text
    messages = []
    for (dataset, seed), by_method in groups.items():
        if len(set(by_method.values())) > 1:
            first = next(iter(by_method))
            odd = [m for m, text in by_method.items() if text != by_method[first]]
            messages.append(f"dataset {dataset!r}, seed {seed}: {odd} differ from {first!r}")
    return messages


def results_config(specs: Sequence[RunSpec], dataset: str) -> ExperimentConfig:
    """The config of the first run of ``dataset`` (its data section is every method's)."""
    return next(s.config for s in specs if s.dataset == dataset)


def _source(config: ExperimentConfig) -> str:
    """The data a dataset column was drawn from: ``data.dataset`` (with its hub config), or for a
    federation built from ``data.groups`` its groups' sources joined with ``+``."""
    data = config.data
    if data.groups is not None:
        return configured_dataset_name(data)
    return data.dataset if data.hub_config is None else f"{data.dataset}/{data.hub_config}"


def _device_name(specs: Sequence[RunSpec]) -> str:
    try:
        import torch

        from fedtreelora.engines.setup import resolve_device

        device = resolve_device(specs[0].config.train.device)
        if device.type == "cuda":
            return torch.cuda.get_device_name(device)
        return f"CPU, {torch.get_num_threads()} threads"
    except Exception:  # the description is cosmetic
        return "unknown device"
