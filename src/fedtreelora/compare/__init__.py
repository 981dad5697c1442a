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
run) resumes from its last checkpoint; an unfinished run whose config differs is deleted and run again.
A *finished* run whose config differs (typically a forgotten ``--set``) is an error, raised before anything
runs, unless ``replace`` (``--replace``) asks to delete and rerun it.

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

import datetime as dt
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from fedtreelora.compare.render import (
    ARI_RULE,
    ARI_TITLE,
    CONVENTIONS,
    MARK_RULE,
    METRIC_NAMES,
    REFERENCE_NAMES,
    ROUND_NAMES,
    _cell,
    _markdown_table,
    _plot,
    ari_text,
    convention_name,
    csv_columns,
    difference_text,
    metric_name,
    plot_rows,
    render_ari_section,
    render_markdown,
    render_paired_section,
    write_outputs,
)
from fedtreelora.compare.runs import (
    CompareResult,
    RunResult,
    RunSpec,
    _device_name,
    _read_summary,
    _source,
    check_nothing_finished_is_replaced,
    comparable,
    execute_run,
    finished_runs_of_other_configs,
    partition_mismatches,
    plan_runs,
    read_partitions,
    results_config,
    run_folder,
    stored_config_matches,
)
from fedtreelora.compare.stats import (
    ADDED_PREFIXES,
    AVERAGE,
    METRICS,
    PER_CLIENT_KEYS,
    REFERENCES,
    Column,
    RunKey,
    _score,
    ari_tables,
    depth_groups,
    difference_cell,
    difference_key,
    difference_values,
    is_marked,
    majority_rate,
    mean_std,
    paired_differences,
    paired_tables,
    summarise,
    table_columns,
)
from fedtreelora.progress import progress_bars
from fedtreelora.suites import Suite

__all__ = [
    "check_nothing_finished_is_replaced",
    "finished_runs_of_other_configs",
    "ADDED_PREFIXES",
    "ARI_RULE",
    "ARI_TITLE",
    "AVERAGE",
    "CONVENTIONS",
    "MARK_RULE",
    "METRICS",
    "METRIC_NAMES",
    "PER_CLIENT_KEYS",
    "REFERENCES",
    "REFERENCE_NAMES",
    "ROUND_NAMES",
    "Column",
    "CompareResult",
    "RunKey",
    "RunResult",
    "RunSpec",
    "_cell",
    "_markdown_table",
    "_read_summary",
    "_score",
    "_source",
    "ari_tables",
    "ari_text",
    "comparable",
    "convention_name",
    "csv_columns",
    "depth_groups",
    "difference_cell",
    "difference_key",
    "difference_text",
    "difference_values",
    "execute_run",
    "is_marked",
    "majority_rate",
    "mean_std",
    "metric_name",
    "paired_differences",
    "paired_tables",
    "partition_mismatches",
    "plan_runs",
    "plot_rows",
    "read_partitions",
    "render_ari_section",
    "render_markdown",
    "render_paired_section",
    "results_config",
    "run_compare",
    "run_folder",
    "stored_config_matches",
    "summarise",
    "table_columns",
    "write_outputs",
]


def _run_line(index: int, total: int, result: RunResult) -> str:
    s, spec = result.summary, result.spec
    best, final = _score(s, "best_mean"), _score(s, "final_mean")
    federated, federated_round = _score(s, "best_federated_mean"), s.best_federated_round
    after = "-" if federated_round is None else f"{federated:6.2f} (round {federated_round + 1})"
    if result.reused:
        how = f"reused (ran {s.wall_seconds or 0.0:.1f} s)"
    else:
        how = f"{result.seconds:.1f} s" + ("" if result.status == "new" else f" ({result.status})")
    privacy = s.privacy
    eps = "" if privacy is None else "  eps " + ("unbounded" if privacy.epsilon is None else f"{privacy.epsilon:.2f}")
    return (
        f"[{index}/{total}] {spec.dataset:<12} {spec.method:<12} seed {spec.seed}: best {best:6.2f} "
        f"(round {(-1 if s.best_round is None else s.best_round) + 1}), best federated {after}, final {final:6.2f}"
        f"{eps}  {how}"
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
    replace: bool = False,
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
        replace: delete and run again finished runs in ``out`` made with another config; without it such
            runs are an error (raised before anything runs).
    """
    out = Path(out)
    console = console or Console(stderr=True)
    specs = plan_runs(suite, out, methods=methods, seeds=seeds, datasets=datasets, overrides=overrides)
    if not replace:
        check_nothing_finished_is_replaced(specs)
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
