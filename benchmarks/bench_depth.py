"""How deep can clients share? Depth-limited FedAvg at several heterogeneity levels, as one plot and one table.

Runs a depth suite (default ``depth``: FedIT sharing the first d layers, d = 0..6, and the last 3 only,
on one source at several Dirichlet label skews) through ``fedtreelora compare``'s machinery (finished runs
in ``--out`` are reused, so an interrupted sweep continues), then reads each run folder's
``summary.json`` (``by_convention``: both evaluation conventions, whatever the headline) and writes

- ``depth.png``: mean accuracy against the number of shared layers d, one line per heterogeneity level
  with the seeds' standard deviation as error bars; the deep-half row (``share-last-3``) as a hollow
  marker at d = 3 in its level's colour. Left: the model each client receives (the headline); right:
  after local training.
- ``depth.md``: per convention and per round choice (best, final), a table of level x d with mean ±
  sample std over seeds, the deep-half column, and the mean rate of each client's majority class.

    python benchmarks/bench_depth.py --suite depth --out runs/depth
    python benchmarks/bench_depth.py --suite depth --out runs/depth --seeds 0 --datasets alpha-1
    python benchmarks/bench_depth.py --out runs/depth --no-run     # tables and plot of what is finished
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench_scoring import CONVENTIONS, cell

from fedtreelora.compare import run_compare
from fedtreelora.compare.stats import majority_rate, mean_std
from fedtreelora.runfolder import ComparisonFolder, Convention, RunSummary
from fedtreelora.suites import Suite, load_suite

ROW = re.compile(r"^share-(first|last)-(\d+)$")
"""A depth suite's row names: ``share-first-D`` (the first D layers shared), ``share-last-K``."""

ROUNDS = {"best": "best_mean", "final": "final_mean"}
"""Which round of a run is scored: the best (as the paper reports) or the last."""

TITLES = {
    Convention.RECEIVED: f"{Convention.RECEIVED.subject} (headline)",
    Convention.TRAINED: Convention.TRAINED.scored,
}
"""A convention -> the heading of its tables in ``depth.md``."""

NUDGE = 0.12
"""How far right of d = k a last-k point is drawn."""

Scores = dict[str, dict[str, list[float]]]
"""level -> row -> one score per seed."""


def row_depth(row: str) -> tuple[str, int] | None:
    """``("first", d)`` or ``("last", k)`` for a depth row name, None for any other row."""
    match = ROW.match(row)
    return None if match is None else (match.group(1), int(match.group(2)))


def read_summaries(
    out: Path, levels: Sequence[str], rows: Sequence[str], seeds: Sequence[int]
) -> dict[tuple[str, str, int], RunSummary]:
    """(level, row, seed) -> the run's ``summary.json``, for every requested run that has finished."""
    found: dict[tuple[str, str, int], RunSummary] = {}
    comparison = ComparisonFolder(out)
    for level in levels:
        for row in rows:
            for seed in seeds:
                summary = comparison.run(level, row, seed).read_run_summary()
                if summary is not None:
                    found[(level, row, seed)] = summary
    return found


def gather(
    summaries: Mapping[tuple[str, str, int], Mapping[str, Any]], convention: Convention | str, key: str
) -> Scores:
    """level -> row -> the runs' ``by_convention[convention][key]`` (seeds in ascending order; runs that
    did not record the convention are left out)."""
    scores: Scores = {}
    for (level, row, _seed), summary in sorted(summaries.items()):
        headline = RunSummary(summary).by_convention(Convention(convention))
        value = None if headline is None else headline.score(key)
        if value is not None:
            scores.setdefault(level, {}).setdefault(row, []).append(value)
    return scores


def majority_rates(
    out: Path, levels: Sequence[str], rows: Sequence[str], seeds: Sequence[int]
) -> dict[str, list[float]]:
    """level -> one majority rate per seed, from the first row whose run folder has a ``partition.json``
    (every row of a (level, seed) sees the same partition; :func:`fedtreelora.compare.stats.majority_rate`)."""
    rates: dict[str, list[float]] = {}
    comparison = ComparisonFolder(out)
    for level in levels:
        for seed in seeds:
            for row in rows:
                partition = comparison.run(level, row, seed).read_partition()
                if partition is not None:
                    rates.setdefault(level, []).append(majority_rate(partition))
                    break
    return rates


def depth_columns(rows: Sequence[str]) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """The depth rows as ``(d, row)`` pairs, ascending: the first-d rows, and the last-k rows (other
    rows are left out)."""
    columns: dict[str, list[tuple[int, str]]] = {"first": [], "last": []}
    for row in rows:
        position = row_depth(row)
        if position is not None:
            columns[position[0]].append((position[1], row))
    return sorted(columns["first"]), sorted(columns["last"])


def column_title(kind: str, d: int, num_layers: int | None) -> str:
    """A table header: ``d=0 (local)``, ``d=3``, ``d=6 (FedIT)``, ``last 3 only``."""
    if kind == "last":
        return f"last {d} only"
    if d == 0:
        return "d=0 (local)"
    return f"d={d} (FedIT)" if d == num_layers else f"d={d}"


def depth_table(
    scores: Scores,
    levels: Sequence[str],
    rows: Sequence[str],
    labels: Mapping[str, str] | None = None,
    majority: Mapping[str, Sequence[float]] | None = None,
    num_layers: int | None = None,
) -> str:
    """A markdown table: one line per level, one column per shared depth d, then the last-k columns and
    the majority rate; cells are mean ± sample std over seeds in % (``n/a`` where no run finished), the
    best first-d cell of a level in bold."""
    first, last = depth_columns(rows)
    labels, majority = labels or {}, majority or {}
    head = ["level", "seeds", *(column_title("first", d, num_layers) for d, _ in first)]
    head += [column_title("last", k, num_layers) for k, _ in last] + ["majority class"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for level in levels:
        by_row = scores.get(level, {})
        means = {r: mean_std(by_row[r])[0] for _, r in first if by_row.get(r)}
        best = max(means.values()) if means else None
        cells = [labels.get(level, level), str(max((len(v) for v in by_row.values()), default=0))]
        for _, r in first:
            text = cell(by_row.get(r, []))
            cells.append(f"**{text}**" if r in means and means[r] == best else text)
        cells += [cell(by_row.get(r, [])) for _, r in last]
        cells.append(cell(list(majority.get(level, []))))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curves(
    scores: Scores, levels: Sequence[str], rows: Sequence[str]
) -> dict[str, dict[tuple[str, int], tuple[float, float]]]:
    """level (in ``levels`` order) -> ``(kind, d)`` -> (mean, std) over seeds, in %, for the depth rows
    that have runs."""
    out: dict[str, dict[tuple[str, int], tuple[float, float]]] = {}
    for level in levels:
        by_row = scores.get(level, {})
        for row in rows:
            position = row_depth(row)
            if position is not None and by_row.get(row):
                mean, std = mean_std(by_row[row])
                out.setdefault(level, {})[position] = (100 * mean, 100 * std)
    return out


def plot_depth(
    panels: Mapping[str, Mapping[str, Mapping[tuple[str, int], tuple[float, float]]]],
    path: str | Path,
    labels: Mapping[str, str] | None = None,
    num_layers: int | None = None,
) -> Path:
    """Draw mean accuracy against the shared depth d, one panel per entry of ``panels``.

    Args:
        panels: panel title -> level -> ``(kind, d)`` -> (mean %, std %), as :func:`curves` gives;
            ``("first", d)`` points make a level's line, ``("last", k)`` points are drawn at d = k
            (nudged right by ``NUDGE`` so they never hide the line's point there) as hollow markers of
            the same colour.
        path: the PNG to write (parent folders are created).
        labels: level -> legend text (default: the level's name).
        num_layers: the model's layers (labels d = num_layers as FedIT).
    Returns:
        the path written.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from fedtreelora.report.plots import figure_png

    labels = labels or {}
    fig = Figure(figsize=(5.2 * max(1, len(panels)), 4.2))
    axes = fig.subplots(1, max(1, len(panels)), squeeze=False, sharey=True)[0]
    depths: set[int] = set()
    deep: set[int] = set()
    for ax, (title, levels) in zip(axes, panels.items(), strict=False):
        for i, (level, points) in enumerate(levels.items()):
            color = f"C{i % 10}"
            line = sorted((d, mean, std) for (kind, d), (mean, std) in points.items() if kind == "first")
            depths.update(d for d, _, _ in line)
            if line:
                xs, ys, es = zip(*line, strict=True)
                ax.errorbar(xs, ys, yerr=es, color=color, marker="o", capsize=3, label=labels.get(level, level))
            for (kind, k), (mean, std) in points.items():
                if kind == "last":
                    depths.add(k)
                    deep.add(k)
                    ax.errorbar([k + NUDGE], [mean], yerr=[std], color=color, marker="o", markersize=9,
                                markerfacecolor="none", markeredgewidth=1.5, capsize=3, linestyle="none")  # fmt: skip
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("shared layers d (the first d averaged, the rest local)")
        ax.grid(alpha=0.3)
    ticks = sorted(depths)
    names = {0: "0\nlocal", **({num_layers: f"{num_layers}\nFedIT"} if num_layers else {})}
    for ax in axes:
        ax.set_xticks(ticks, [names.get(d, str(d)) for d in ticks])
    axes[0].set_ylabel("mean accuracy over clients (%)")
    handles, texts = axes[0].get_legend_handles_labels()
    hollow = Line2D([], [], color="black", marker="o", markersize=9, markerfacecolor="none", linestyle="none")
    deep_text = f"deep half only (last {deep.pop()} layers)" if len(deep) == 1 else "deep layers only (last k)"
    axes[-1].legend([*handles, hollow], [*texts, deep_text], fontsize=8, loc="best")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(figure_png(fig))
    return out


def level_labels(
    suite: Suite, levels: Sequence[str], row: str, seed: int, overrides: Sequence[str] = ()
) -> dict[str, str]:
    """level -> ``"<level> (Dirichlet α A)"`` from the suite's resolved config of that level."""
    labels = {}
    for level in levels:
        alpha = suite.resolve(row, level, seed, list(overrides)).data.dirichlet_alpha
        labels[level] = f"{level} (Dirichlet α {alpha:g})"
    return labels


def write_outputs(
    out: Path,
    summaries: Mapping[tuple[str, str, int], Mapping[str, Any]],
    levels: Sequence[str],
    rows: Sequence[str],
    labels: Mapping[str, str],
    majority: Mapping[str, Sequence[float]],
    num_layers: int | None,
    header: str,
) -> tuple[Path, Path]:
    """Write ``depth.md`` (both conventions, best and final round) and ``depth.png`` (best round, both
    conventions) into ``out``."""
    sections = [f"# Depth-limited FedAvg\n\n{header}\n"]
    for convention in CONVENTIONS:
        for name, key in ROUNDS.items():
            scores = gather(summaries, convention, key)
            table = depth_table(scores, levels, rows, labels, majority, num_layers)
            sections.append(f"## {convention}, {name} round: {TITLES[convention]}\n\n{table}\n")
    out.mkdir(parents=True, exist_ok=True)
    md = out / "depth.md"
    md.write_text("\n".join(sections))
    panels = {
        f"{c} ({'headline' if c is Convention.RECEIVED else c.scored}), best round": curves(
            gather(summaries, c, "best_mean"), levels, rows
        )
        for c in CONVENTIONS
    }
    png = plot_depth(panels, out / "depth.png", labels, num_layers)
    return md, png


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="depth", help="a depth suite (rows share-first-D, share-last-K)")
    parser.add_argument("--out", default="runs/depth", help="output folder; finished runs in it are reused")
    parser.add_argument("--seeds", metavar="0,1,...", help="seeds (default: the suite's)")
    parser.add_argument(
        "--datasets", metavar="A,B,...", help="heterogeneity levels, i.e. dataset labels (default: all)"
    )
    parser.add_argument("--methods", metavar="A,B,...", help="rows (default: the suite's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    parser.add_argument("--no-run", action="store_true", help="only tabulate and plot the finished runs in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def split(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    suite = load_suite(args.suite)
    out = Path(args.out)
    rows = split(args.methods) or suite.default_methods()
    levels = split(args.datasets) or list(suite.datasets)
    seeds = [int(s) for s in split(args.seeds) or []] or list(suite.seeds)
    command = "python benchmarks/bench_depth.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if not args.no_run:
        run_compare(suite, out, methods=rows, seeds=seeds, datasets=levels, overrides=args.set,
                    quiet=args.quiet, command=command)  # fmt: skip
    summaries = read_summaries(out, levels, rows, seeds)
    config = suite.resolve(rows[0], levels[0], seeds[0], args.set)
    num_layers = config.model.num_layers
    header = (
        f"`{command.strip()}`\n\nSuite `{suite.name}`, rows {', '.join(rows)}, seeds {', '.join(map(str, seeds))}; {len(summaries)} of "
        f"{len(levels) * len(rows) * len(seeds)} runs finished. Cells: mean ± sample std over seeds of the mean "
        "accuracy over clients (%), each client on its own validation split; bold: the best d of a level."
    )
    md, png = write_outputs(
        out, summaries, levels, rows, level_labels(suite, levels, rows[0], seeds[0], args.set),
        majority_rates(out, levels, rows, seeds), num_layers, header,
    )  # fmt: skip
    print(md.read_text())
    print(f"plot: {png}")


if __name__ == "__main__":
    main()
