"""Clients that join a planted federation in the middle of a run: where FedTreeLoRA places them, and how
well they do a few rounds later against the clients of their own group that were there from the start,
against local training and against FedIT.

For each method and seed, one run of the experiment (default: the quickstart's planted federation) in
which the late clients (default: the last client of every planted group, so they are spread over the
groups) join at ``--join-round`` (default: the middle round); every run uses ``fedtreelora.join_*`` as
configured. Per run, the newcomers' and the same groups' founders' received accuracy at the round
``--after`` rounds after the newcomers' own warm-up ends (FedTreeLoRA places them then), and for
FedTreeLoRA the placement agreement with the planted groups per layer (``placement_agreement``). Writes
``joining.md`` (mean ± sample std over seeds, the command, the CPU and the date) into ``--out``.

    python benchmarks/bench_joining.py --out runs/joining
    python benchmarks/bench_joining.py --out runs/joining --seeds 0 --set train.precision=bf16
    python benchmarks/bench_joining.py --out runs/joining --no-run      # the table of what is finished
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedtreelora.compare.stats import mean_std
from fedtreelora.config import ExperimentConfig, load_config, load_run_config
from fedtreelora.data import planted_groups

METHODS = ("fedtreelora", "fedit", "local")


def late_clients(groups: Sequence[str]) -> list[int]:
    """The last client of every planted group (``groups``: (clients,) each client's group), ascending."""
    last = {name: k for k, name in enumerate(groups)}
    return sorted(last.values())


def experiment(
    config_path: str | None, overrides: Sequence[str], method: str, seed: int, join_round: int | None
) -> tuple[ExperimentConfig, list[int], int]:
    """The run's config with the late clients joining, the late clients and the (1-based) join round."""
    base = load_run_config(config_path, list(overrides), method=method, seed=seed)
    groups = planted_groups(base.data)
    if groups is None:
        raise SystemExit("bench_joining needs a planted federation (data.groups)")
    late = late_clients(groups)
    rounds = base.federation.rounds
    join = join_round or rounds // 2 + 1
    schedule = json.dumps({str(k): join for k in late}).replace('"', "")
    config = load_run_config(config_path, [*overrides, f"federation.join={schedule}"], method=method, seed=seed)
    return config, late, join


def scored_round(config: ExperimentConfig, join: int, after: int) -> int:
    """The 0-based round the newcomers are compared at: ``after`` rounds after their own warm-up ends
    (its length is FedTreeLoRA's ``join_warmup_rounds``, the same round for every method), capped at
    the last round."""
    options = config.fedtreelora
    warmup = options.join_warmup_rounds or options.warmup_rounds
    return min(config.federation.rounds - 1, join - 1 + warmup - 1 + after)


def run_one(config: ExperimentConfig, out: Path) -> dict[str, Any]:
    """The run's summary (a finished run in ``out`` is read, not run again).

    Raises:
        SystemExit: ``out`` holds a finished run of another config (its ``config.yaml`` differs).
    """
    summary = out / "summary.json"
    if summary.is_file():
        saved = out / "config.yaml"
        if saved.is_file() and load_config(saved) != config:
            raise SystemExit(
                f"{out} holds a finished run of another config than this one; pass another --out, or remove "
                f"{out} to run it again"
            )
        return json.loads(summary.read_text())
    from fedtreelora.engines import SimulationEngine

    return SimulationEngine(config, out, quiet=True, report=False).run()


def newcomer_scores(folder: Path, summary: dict[str, Any], late: Sequence[int], rnd: int) -> tuple[float, float]:
    """(newcomers' mean, the same groups' founders' mean) received accuracy at round ``rnd`` (0-based),
    from the run folder's ``metrics.jsonl``."""
    groups = summary["planted_groups"]
    scores: dict[int, float] = {}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("round") == rnd and record.get("received_accuracy") is not None:
            scores[int(record["client"])] = float(record["received_accuracy"])
    late_groups = {groups[k] for k in late}
    mine = [v for k, v in scores.items() if k in late]
    founders = [v for k, v in scores.items() if k not in late and groups[k] in late_groups]
    if not mine or not founders:
        raise ValueError(f"{folder}: no scores of the newcomers or their founders at round {rnd + 1}")
    return float(np.mean(mine)), float(np.mean(founders))


def cell(values: Sequence[float]) -> str:
    """``mean ± std`` in percent."""
    mean, std = mean_std(values)
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", default=None, help="experiment file (default: the quickstart)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--join-round", type=int, default=None, help="1-based; default the middle round")
    parser.add_argument("--after", type=int, default=2, help="rounds after the newcomers' warm-up ends")
    parser.add_argument("--no-run", action="store_true", help="only tabulate finished runs")
    args = parser.parse_args(argv)

    rows: dict[str, dict[str, list[float]]] = {}
    agreement: list[list[list[float | None]]] = []
    late: list[int] = []
    join = rnd = 0
    for method in args.methods:
        for seed in args.seeds:
            config, late, join = experiment(args.config, args.overrides, method, seed, args.join_round)
            folder = args.out / f"{method}-seed{seed}"
            if args.no_run and not (folder / "summary.json").is_file():
                continue
            summary = run_one(config, folder)
            rnd = scored_round(config, join, args.after)
            mine, founders = newcomer_scores(folder, summary, late, rnd)
            scores = rows.setdefault(method, {"newcomers": [], "founders": []})
            scores["newcomers"].append(mine)
            scores["founders"].append(founders)
            if method == "fedtreelora" and summary.get("placement_agreement") is not None:
                agreement.append(summary["placement_agreement"])

    lines = [
        "# Clients joining a planted federation",
        "",
        f"Command: `python benchmarks/bench_joining.py {' '.join(sys.argv[1:] if argv is None else argv)}`; "
        f"CPU: {cpu_model()}; date: {datetime.date.today().isoformat()}; seeds {args.seeds}.",
        f"Late clients {late} (the last of every planted group) join at round {join}; scored at round "
        f"{rnd + 1} (received accuracy %, mean ± sample std over seeds).",
        "",
        "| method | newcomers | founders of their groups |",
        "|---|---:|---:|",
    ]
    for method, scores in rows.items():
        lines.append(f"| {method} | {cell(scores['newcomers'])} | {cell(scores['founders'])} |")
    if agreement:
        lines += ["", "FedTreeLoRA placement agreement with the planted groups (per layer, per depth), by seed:", ""]
        lines += [f"- {json.dumps(a)}" for a in agreement]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "joining.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
