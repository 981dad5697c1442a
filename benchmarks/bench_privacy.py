"""The privacy-utility trade-off: FedIT, FedSA-LoRA, FedLEASE and FedTreeLoRA at several target epsilons
(and without privacy) on a suite's federation, scored on the model each client receives.

Runs every (method, epsilon, seed) of one suite dataset in process (``privacy.clip_norm`` and
``privacy.target_epsilon`` set on top of the suite's config; ``none`` leaves privacy off), skipping a run
whose folder already holds a finished run, then writes beside the runs:

- ``privacy.md``: per method and epsilon, the final mean over clients (mean ± sample std over seeds, in
  points) and the noise multiplier each target gave; and, for the methods that cluster (FedLEASE,
  FedTreeLoRA), each client's loss against the same method without privacy, grouped by the size of the
  client's cluster at the deepest layer (where the tree's small clusters pay for the noise);
- ``privacy.png``: accuracy against epsilon, one line per method (``none`` at the right).

    python benchmarks/bench_privacy.py runs/privacy                      # planted-cpu, swap-in-tweets
    python benchmarks/bench_privacy.py runs/privacy --epsilons 4,none --seeds 0 --set federation.rounds=2
    python benchmarks/bench_privacy.py runs/privacy --report-only        # tables and plot from the runs there
    python benchmarks/bench_privacy.py runs/privacy --config quickstart  # the default experiment's federation
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from fedtreelora.compare.stats import majority_rate, mean_std
from fedtreelora.config import ExperimentConfig, load_config, load_run_config
from fedtreelora.runfolder import RunFolder, RunSummary
from fedtreelora.suites import load_suite

METHODS = ("fedit", "fedsa", "fedlease", "fedtreelora")
EPSILONS = ("1", "4", "8", "none")
CLUSTERING = ("fedlease", "fedtreelora")


def run_folder(out: Path, dataset: str, epsilon: str, method: str, seed: int) -> Path:
    return out / dataset / f"eps-{epsilon}" / method / f"seed-{seed}"


def privacy_overrides(epsilon: str, clip_norm: float, delta: float, accountant: str) -> list[str]:
    """The ``--set`` assignments of one epsilon (none for ``none``)."""
    if epsilon == "none":
        return []
    return [
        f"privacy.clip_norm={clip_norm}",
        f"privacy.target_epsilon={float(epsilon)}",
        f"privacy.delta={delta}",
        f"privacy.accountant={accountant}",
    ]


def read_summary(folder: Path) -> RunSummary | None:
    """The summary of the finished run in ``folder``; None when it has not finished."""
    return RunFolder(folder).read_run_summary()


def run_one(config: ExperimentConfig, folder: Path) -> RunSummary:
    from fedtreelora.engines import SimulationEngine

    return RunSummary(SimulationEngine(config, folder, quiet=True, report=False).run())


def cluster_sizes(summary: RunSummary) -> list[int] | None:
    """Each client's cluster size at the deepest layer (labels' last row); None without labels."""
    labels = summary.labels
    if not labels:
        return None
    last = labels[-1]
    return [sum(1 for other in last if other == mine) if mine >= 0 else 0 for mine in last]


def score(summary: RunSummary) -> float:
    value = summary.final_mean
    return math.nan if value is None else 100.0 * value


def report(out: Path, dataset: str, methods: Sequence[str], epsilons: Sequence[str], seeds: Sequence[int]) -> str:
    """``privacy.md`` and ``privacy.png`` from the finished runs under ``out``; returns the markdown."""
    summaries = {
        (m, e, s): summary
        for m in methods
        for e in epsilons
        for s in seeds
        if (summary := read_summary(run_folder(out, dataset, e, m, s))) is not None
    }
    majority = [
        100.0 * majority_rate(json.loads(partition.read_text()))
        for s in seeds
        if (partition := run_folder(out, dataset, epsilons[0], methods[0], s) / "partition.json").is_file()
    ]
    floor = f"{mean_std(majority)[0]:.2f}" if majority else "-"
    lines = [f"# Privacy-utility trade-off on {dataset}", "", "Final mean accuracy of the received model, points "
             "(mean ± sample std over seeds); z: the noise multiplier each target epsilon gave. Predicting "
             f"each client's majority class scores {floor} (mean over seeds).", "",
             "| method | " + " | ".join(f"eps {e}" for e in epsilons) + " |",
             "|---|" + "---|" * len(epsilons)]  # fmt: skip
    curves: dict[str, list[tuple[str, float, float]]] = {}
    for m in methods:
        cells = []
        for e in epsilons:
            runs = [summaries[(m, e, s)] for s in seeds if (m, e, s) in summaries]
            if not runs:
                cells.append("-")
                continue
            mean, std = mean_std([score(r) for r in runs])
            z = None if (privacy := runs[0].privacy) is None else privacy.noise_multiplier
            cells.append(f"{mean:.2f} ± {std:.2f}" + ("" if z is None else f" (z {z:.2f})") + f" n={len(runs)}")
            curves.setdefault(m, []).append((e, mean, std))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "Loss against the same method without privacy, by the client's cluster size at the deepest layer",
              "(points, mean over clients and seeds; n: client-runs):", "",
              "| method | eps | " + " | ".join(["size 1-2", "size 3-4", "size 5+"]) + " |", "|---|---|---|---|---|"]  # fmt: skip
    for m in (c for c in methods if c in CLUSTERING):
        for e in (x for x in epsilons if x != "none"):
            buckets: dict[str, list[float]] = {"size 1-2": [], "size 3-4": [], "size 5+": []}
            for s in seeds:
                noisy, plain = summaries.get((m, e, s)), summaries.get((m, "none", s))
                if noisy is None or plain is None or (sizes := cluster_sizes(noisy)) is None:
                    continue
                finals = zip(noisy.per_client_at("final_mean"), plain.per_client_at("final_mean"), strict=False)
                for size, (a, b) in zip(sizes, finals, strict=False):
                    if a is None or b is None:
                        continue
                    bucket = "size 1-2" if size <= 2 else "size 3-4" if size <= 4 else "size 5+"
                    buckets[bucket].append(100.0 * (b - a))
            cells = [f"{mean_std(v)[0]:+.2f} n={len(v)}" if v else "-" for v in buckets.values()]
            lines.append(f"| {m} | {e} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (out / "privacy.md").write_text(text)
    _plot(out / "privacy.png", curves, epsilons, dataset, mean_std(majority)[0] if majority else None)
    return text


def _plot(
    path: Path,
    curves: Mapping[str, list[tuple[str, float, float]]],
    epsilons: Sequence[str],
    title: str,
    majority: float | None = None,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    positions = {e: i for i, e in enumerate(epsilons)}
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for method, points in curves.items():
        xs = [positions[e] for e, _, _ in points]
        ax.errorbar(xs, [m for _, m, _ in points], yerr=[s for _, _, s in points], marker="o", capsize=3, label=method)
    if majority is not None:
        ax.axhline(majority, color="gray", linestyle="--", linewidth=1, label="majority class")
    ax.set_xticks(range(len(epsilons)), [f"eps {e}" if e != "none" else "no DP" for e in epsilons])
    ax.set_ylabel("final mean accuracy (received), %")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--suite", default="planted-cpu")
    parser.add_argument("--dataset", default="swap-in-tweets")
    parser.add_argument(
        "--config", default=None, help="an experiment file instead of the suite ('quickstart': the default)"
    )
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--epsilons", default=",".join(EPSILONS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--clip-norm", type=float, default=0.05, help="privacy.clip_norm of every private run")
    parser.add_argument("--delta", type=float, default=1e-3, help="privacy.delta (below 1 / clients)")
    parser.add_argument("--accountant", default="rdp", choices=["rdp", "prv"])
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="extra key=value overrides")
    parser.add_argument("--report-only", action="store_true", help="write the tables and plot, run nothing")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    epsilons = [e for e in args.epsilons.split(",") if e]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    suite = load_suite(args.suite) if args.config is None else None
    dataset = args.dataset if args.config is None else Path(args.config).stem
    if not args.report_only:
        for e in epsilons:
            for m in methods:
                for s in seeds:
                    folder = run_folder(args.out, dataset, e, m, s)
                    if read_summary(folder) is not None:
                        continue
                    extra = [*args.overrides, *privacy_overrides(e, args.clip_norm, args.delta, args.accountant)]
                    if suite is not None:
                        config = suite.resolve(m, args.dataset, s, extra)
                    elif args.config == "quickstart":
                        config = load_run_config(None, extra, method=m, seed=s)
                    else:
                        config = load_config(args.config, extra, method=m, seed=s)
                    summary = run_one(config, folder)
                    eps = None if summary.privacy is None else summary.privacy.epsilon
                    print(f"{m} eps={e} seed={s}: {score(summary):.2f}" + ("" if eps is None else f" (eps {eps:.2f})"))
    print(report(args.out, dataset, methods, epsilons, seeds))


if __name__ == "__main__":
    main()
