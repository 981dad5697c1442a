"""Both evaluation conventions side by side: every method of a suite scored on the model each client
receives after aggregation (the papers' convention) and right after its local training.

Runs ``fedtreelora compare`` on the suite (finished runs in ``--out`` are reused, so an interrupted
benchmark continues), then reads each run's ``summary.json``, which records both conventions whatever
``federation.evaluate`` picked as the headline, and prints one markdown table: per dataset and method,
mean +- sample std over seeds of the best-round and final-round mean accuracy under each convention.

    python benchmarks/bench_scoring.py --suite cpu --out runs/cpu
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from fedtreelora.compare.stats import majority_rate, mean_std
from fedtreelora.runfolder import ComparisonFolder, Convention, Headline, RunSummary

CONVENTIONS = tuple(Convention)
"""Both conventions, the headline one (``received``) first."""


def cell(values: list[float]) -> str:
    """``mean +- std`` in % (sample std; 0.00 with one value)."""
    if not values:
        return "n/a"
    mean, std = mean_std(values)
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def collect(out: Path) -> dict[tuple[str, str], list[RunSummary]]:
    """(dataset, method) -> the summaries of its finished seeds."""
    found: dict[tuple[str, str], list[RunSummary]] = {}
    for dataset, method, _seed, run in ComparisonFolder(out).runs():
        found.setdefault((dataset, method), []).append(run.require_run_summary())
    return found


def majority_rates(out: Path) -> dict[str, list[float]]:
    """Per dataset, per seed: the mean over clients of the share of the most common label in the
    client's validation split (what predicting each client's majority class scores:
    :func:`fedtreelora.compare.stats.majority_rate`)."""
    rates: dict[str, list[float]] = {}
    for dataset, method, _seed, run in ComparisonFolder(out).runs():
        partition = run.read_partition() if method == "local" else None
        if partition is not None:
            rates.setdefault(dataset, []).append(majority_rate(partition))
    return rates


def table(found: dict[tuple[str, str], list[RunSummary]], methods: list[str]) -> str:
    head = ["dataset", "method", "seeds"]
    head += [f"{c} {k}" for c in CONVENTIONS for k in ("best", "final")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for dataset in sorted({d for d, _ in found}):
        for method in methods:
            runs = found.get((dataset, method), [])
            if not runs:
                continue
            cells = [dataset, method, str(len(runs))]
            for c in CONVENTIONS:
                headlines = [_by_convention(r, c) for r in runs]
                for k in ("best_mean", "final_mean"):
                    cells.append(cell([v for h in headlines if (v := h.score(k)) is not None]))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _by_convention(summary: RunSummary, convention: Convention) -> Headline:
    """The run's headline numbers under ``convention`` (every run this benchmark reads records both)."""
    headline = summary.by_convention(convention)
    if headline is None:
        raise KeyError(f"a {summary.method} run without by_convention[{convention}]")
    return headline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="cpu")
    parser.add_argument("--out", default="runs/cpu")
    parser.add_argument("--no-run", action="store_true", help="only tabulate the finished runs in --out")
    parser.add_argument("--methods", default="local,fedit,fedsa,fedlease,fedtreelora")
    args = parser.parse_args()
    out = Path(args.out)
    if not args.no_run:
        command = [sys.executable, "-m", "fedtreelora.cli", "compare", "--suite", args.suite, "--out", str(out)]
        subprocess.run([*command, "--quiet", "--methods", args.methods], check=True)
    print(table(collect(out), args.methods.split(",")))
    for dataset, rates in majority_rates(out).items():
        print(f"\n{dataset}: each client's majority class scores {cell(rates)} (mean over clients, {len(rates)} seeds)")


if __name__ == "__main__":
    main()
