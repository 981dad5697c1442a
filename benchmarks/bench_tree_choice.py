"""Which sharing plan, and does sharing hurt? FedTreeLoRA's fixed-tau sweep, ``tau: auto`` and the personal
expert against the better of local training and FedIT, from a finished ``compare`` folder.

Reads ``compare.json`` of a ``fedtreelora compare --suite nlu-cpu-tree`` folder (any suite whose rows
include ``local``, ``fedit``, ``fedtreelora`` and FedTreeLoRA variants works) and writes ``choice.md``
beside it, at the final round (the model each client receives after the last aggregation, as the
suite's convention says) and at the best round:

- per dataset, every FedTreeLoRA row's mean ± sample std over seeds;
- ``tau: auto`` against the best fixed tau of that dataset (the fixed row with the highest mean): the
  paired difference over seeds (mean ± std), and whether auto's mean lies within the seed spread (one
  standard deviation over seeds) of the best fixed tau's;
- every FedTreeLoRA row against the better of ``local`` and ``fedit`` on that dataset (by mean), paired
  on seed; ``*`` where |mean| exceeds 2 standard errors of the paired differences (a rough screen with
  3 seeds, as in ``compare``); and the worst gap of each row over the datasets.

    python benchmarks/bench_tree_choice.py runs/nlu-cpu-tree
    python benchmarks/bench_tree_choice.py runs/nlu-cpu-tree --fixed fedtreelora=0.3,tau-0.0=0.0 --auto fedtreelora-auto
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedtreelora.compare.stats import difference_cell, mean_std
from fedtreelora.runfolder import ComparisonFolder, Headline

ROUNDS = {"final": "final_mean", "best": "best_mean"}
DEFAULT_FIXED = {"tau-0.0": 0.0, "tau-0.1": 0.1, "tau-0.2": 0.2, "fedtreelora": 0.3}
"""Rows of the nlu-cpu-tree suite that fix tau, and their tau."""


def scores(runs: Sequence[Mapping[str, Any]], key: str) -> dict[str, dict[str, dict[int, float]]]:
    """dataset -> method -> seed -> score in points, from compare.json's ``runs`` (each with the run's
    headline numbers: :class:`fedtreelora.runfolder.Headline`)."""
    out: dict[str, dict[str, dict[int, float]]] = {}
    for run in runs:
        value = Headline.from_mapping(run).score(key)
        if value is None:
            raise SystemExit(f"{run['dataset']} {run['method']} seed {run['seed']}: compare.json has no {key}")
        out.setdefault(run["dataset"], {}).setdefault(run["method"], {})[int(run["seed"])] = 100.0 * value
    return out


def paired(mine: Mapping[int, float], theirs: Mapping[int, float]) -> tuple[float, float, int, bool]:
    """Paired difference over the seeds both have: mean, sample std, pairs, and |mean| > 2 SE
    (:func:`fedtreelora.compare.stats.difference_cell`; NaN and no mark without pairs)."""
    d = difference_cell({s: mine[s] - theirs[s] for s in set(mine) & set(theirs)})
    return d["mean"], d["std"], d["n"], d["marked"]


def cell(mean: float, std: float, star: bool = False) -> str:
    return f"{mean:+.2f} ± {std:.2f}{'*' if star else ''}"


def reference(by_method: Mapping[str, Mapping[int, float]]) -> str:
    """The better of local training and FedIT on one dataset, by mean over seeds."""
    present = [m for m in ("local", "fedit") if m in by_method]
    if not present:
        raise SystemExit("the comparison has neither a local nor a fedit row; run them first")
    return max(present, key=lambda m: statistics.fmean(by_method[m].values()))


def tree_rows(by_dataset: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Every row that is neither local nor FedIT (FedTreeLoRA and its variants), in first-seen order."""
    rows: list[str] = []
    for by_method in by_dataset.values():
        rows += [m for m in by_method if m not in ("local", "fedit") and m not in rows]
    return rows


def section(
    by_dataset: Mapping[str, Mapping[str, Mapping[int, float]]], fixed: Mapping[str, float], auto: str
) -> list[str]:
    """Markdown for one round choice."""
    datasets = list(by_dataset)
    rows = tree_rows(by_dataset)
    lines = ["| row | " + " | ".join(datasets) + " |", "|---|" + "---:|" * len(datasets)]
    for row in ["local", "fedit", *rows]:
        cells = []
        for d in datasets:
            values = list(by_dataset[d].get(row, {}).values())
            cells.append(f"{mean_std(values)[0]:.2f} ± {mean_std(values)[1]:.2f}" if values else "—")
        label = f"{row} (tau {fixed[row]})" if row in fixed else row
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "`tau: auto` against the best fixed tau of each dataset (paired on seed):", ""]
    lines += [
        "| dataset | best fixed tau | its mean ± std | auto mean ± std | auto − best (paired) | within the spread |"
    ]
    lines += ["|---|---:|---:|---:|---:|---|"]
    for d in datasets:
        by_method = by_dataset[d]
        present = [r for r in fixed if r in by_method]
        if not present or auto not in by_method:
            continue
        best = max(present, key=lambda r: statistics.fmean(by_method[r].values()))
        bm, bs = mean_std(list(by_method[best].values()))
        am, as_ = mean_std(list(by_method[auto].values()))
        dm, ds, _, star = paired(by_method[auto], by_method[best])
        within = "yes" if abs(am - bm) <= bs else "no"
        lines.append(
            f"| {d} | {fixed[best]} | {bm:.2f} ± {bs:.2f} | {am:.2f} ± {as_:.2f} | {cell(dm, ds, star)} | {within} |"
        )
    refs = {d: reference(by_dataset[d]) for d in datasets}
    lines += [
        "",
        "Against the better of local training and FedIT on each dataset (paired on seed; the reference row "
        "is named in the header):",
        "",
    ]
    lines += ["| row | " + " | ".join(f"− {refs[d]}, {d}" for d in datasets) + " | worst |"]
    lines += ["|---|" + "---:|" * (len(datasets) + 1)]
    for row in rows:
        cells, worst = [], math.inf
        for d in datasets:
            if row not in by_dataset[d]:
                cells.append("—")
                continue
            dm, ds, _, star = paired(by_dataset[d][row], by_dataset[d][refs[d]])
            cells.append(cell(dm, ds, star))
            worst = min(worst, dm)
        label = f"{row} (tau {fixed[row]})" if row in fixed else row
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {worst:+.2f} |")
    return lines


def report(compare: Mapping[str, Any], fixed: Mapping[str, float], auto: str) -> str:
    """The whole ``choice.md``."""
    seeds = sorted({int(r["seed"]) for r in compare["runs"]})
    lines = [
        f"# FedTreeLoRA: fixed tau, tau auto, and the gap to the better of local and FedIT ({compare['suite']})",
        "",
        f"Accuracy in points, mean ± sample std over seeds {seeds}; the model each client "
        f"{'receives' if compare.get('evaluate', 'received') == 'received' else 'trained'}; `*`: |mean| > 2 "
        "standard errors of the paired differences.",
        "",
    ]
    for name, key in ROUNDS.items():
        lines += [f"## {name.capitalize()} round", ""]
        lines += section(scores(compare["runs"], key), fixed, auto) + [""]
    return "\n".join(lines)


def parse_fixed(text: str | None) -> dict[str, float]:
    if not text:
        return dict(DEFAULT_FIXED)
    out = {}
    for item in text.split(","):
        row, _, tau = item.partition("=")
        out[row.strip()] = float(tau)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a finished compare folder (holds compare.json)")
    parser.add_argument("--fixed", help="ROW=TAU,... rows that fix tau (default: the nlu-cpu-tree suite's)")
    parser.add_argument("--auto", default="fedtreelora-auto", help="the tau: auto row (default fedtreelora-auto)")
    args = parser.parse_args()
    compare = ComparisonFolder(args.folder).read_compare()
    text = report(compare, parse_fixed(args.fixed), args.auto)
    (args.folder / "choice.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
