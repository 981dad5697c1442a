"""A planted federation whose groups change mid-run: one group's labels swap at a known round
(``data.groups[i].drift``). Does FedTreeLoRA's tree follow when it is re-planned
(``fedtreelora.replan_every``), and does the drifted group's accuracy recover; and without re-planning?

For each method and seed, one run of the federation (default: the ``planted-cpu`` suite's
``swap-in-tweets``: sarcasm, tweets/plain and tweets/swapped, 3 clients each) over ``--rounds`` rounds
(default 12) in which one group (``--group``; default the first group that has a mirror, another group of
the same source whose label map swaps its labels: ``tweets/plain``) takes its mirror's labels and name
at ``--drift-round`` (default the middle round); with ``--drifting N`` only N of its clients do (the rest
stay, so a tree built before the swap puts the drifted clients with the wrong group). Methods: FedTreeLoRA as configured (the tree built once),
FedTreeLoRA re-planned every ``--replan-every`` federated rounds from the clients' B updates
(``fedtreelora-replan``) and from their latest uploaded B (``fedtreelora-replan-uploads``), FedIT and local
training. Per method, the
drifted group's received accuracy in the round before the swap, the round of the swap (its clients'
first round on the new labels), the last round and the mean from the swap to the end (how fast it
recovers), and the other clients' in the last round; for
FedTreeLoRA, per layer the ARI of the sharing partition with the groups after the drift (the deepest
planted depth), for the plan in force when the labels swap and for the last plan. Writes ``drift.md``
(mean ± sample std over seeds, the command, the CPU model, the date and the seeds) into ``--out``.

    python benchmarks/bench_drift.py --out runs/drift
    python benchmarks/bench_drift.py --out runs/drift --config quickstart --set federation.rounds=12
    python benchmarks/bench_drift.py --out runs/drift-part --config quickstart --drifting 1
    python benchmarks/bench_drift.py --out runs/drift-smoke --smoke     # tiny sizes, seed 0: a check
    python benchmarks/bench_drift.py --out runs/drift --no-run          # the table of what is finished
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from bench_joining import cell, run_one

from fedtreelora.config import ExperimentConfig, load_config, load_run_config, validate_config
from fedtreelora.core.structure import ari_by_layer, planted_levels
from fedtreelora.data import planted_groups
from fedtreelora.suites import load_suite

#: row -> registered method (the re-planned row adds ``fedtreelora.replan_every`` from --replan-every)
ROWS = {
    "fedtreelora": "fedtreelora",
    "fedtreelora-replan": "fedtreelora",
    "fedtreelora-replan-uploads": "fedtreelora",
    "fedit": "fedit",
    "local": "local",
}
SMOKE = (
    "model.num_layers=1",
    "data.n_train=16",
    "data.n_val=8",
    "train.batch_size=8",
    "train.local_epochs=1",
    "fedtreelora.warmup_rounds=1",
    "logging.tensorboard=false",
)
"""Tiny sizes for ``--smoke`` (with 4 rounds and seed 0): the script end to end in well under a minute."""


@dataclass(frozen=True)
class Drift:
    """The swap the benchmark plants: group ``index`` takes ``label_map`` and ``name`` at ``round`` (1-based)."""

    index: int
    group: str
    name: str
    round: int
    label_map: dict[str, str]


def mirror_drift(groups: Sequence[Mapping[str, Any]], dataset: str, group: str | None, rnd: int) -> Drift:
    """The drift that gives a group its mirror's labels: the mirror is another group of the same source
    (``dataset``: the data section's, for groups without their own) that keeps the same labels under
    another map. ``groups``: ``data.groups`` as dicts; ``group``: the drifting group's name (None: the
    first that has a mirror).

    Raises:
        SystemExit: no such group, or it has no mirror.
    """
    for i, g in enumerate(groups):
        if group is not None and g["name"] != group:
            continue
        own = g.get("label_map") or {}
        for other in groups:
            theirs = other.get("label_map") or {}
            if other is g or (other.get("dataset") or dataset) != (g.get("dataset") or dataset) or theirs == own:
                continue
            names = set(own) | set(theirs)
            kept = {s for s in names if own.get(s, s) is not None}
            if kept != {s for s in names if theirs.get(s, s) is not None}:
                continue
            label_map = {s: theirs.get(s, s) for s in sorted(kept)}
            return Drift(i, g["name"], other["name"], rnd, label_map)
    which = f"group {group!r}" if group is not None else "any group"
    raise SystemExit(
        f"bench_drift: {which} of data.groups has no mirror (another group of the same source keeping the "
        "same labels under another label map); pass --group with a group that has one"
    )


def split_drifting(groups: list[dict[str, Any]], drift: Drift, count: int | None) -> tuple[list[dict[str, Any]], Drift]:
    """Let only ``count`` of the drifting group's clients drift (None or all of them: the whole group).

    A whole group that drifts stays together, so a tree built before the swap still fits it (its clients
    only miss their new mirror's data); a part that drifts leaves its old cluster wrong for it. The part
    becomes its own entry ``<group>-drifting`` right after the group (its last ``count`` clients), which
    takes the mirror's labels and name at the drift's round; the group keeps the rest.

    Args:
        groups: ``data.groups`` as dicts (not modified).
        drift: the drift :func:`mirror_drift` chose.
        count: how many of the group's clients drift.

    Returns:
        The new groups (with the drift planted) and the drift of the entry that carries it.

    Raises:
        SystemExit: ``count`` is below 1 or above the group's clients.
    """
    out = [dict(g) for g in groups]
    entry = out[drift.index]
    clients = int(entry["clients"])
    count = clients if count is None else count
    if not 1 <= count <= clients:
        raise SystemExit(f"bench_drift: --drifting {count} is outside 1..{clients} (group {drift.group!r}'s clients)")
    planted = {"round": drift.round, "label_map": drift.label_map, "name": drift.name}
    if count == clients:
        entry["drift"] = planted
        return out, drift
    entry["clients"] = clients - count
    part = {**entry, "name": f"{drift.group}-drifting", "clients": count, "drift": planted}
    out.insert(drift.index + 1, part)
    return out, Drift(drift.index + 1, part["name"], drift.name, drift.round, drift.label_map)


def base_config(args: argparse.Namespace, method: str, seed: int) -> ExperimentConfig:
    """The run's config before the drift: the suite's dataset, or ``--config`` (``quickstart``: the default
    experiment), with ``--rounds`` and ``--set`` (and ``--smoke``'s sizes)."""
    overrides = [*(SMOKE if args.smoke else ()), f"federation.rounds={args.rounds}", *args.overrides]
    if args.config is None:
        return load_suite(args.suite).resolve(method, args.dataset, seed, overrides)
    if args.config == "quickstart":
        return load_run_config(None, overrides, method=method, seed=seed)
    return load_config(args.config, overrides, method=method, seed=seed)


def experiment(args: argparse.Namespace, row: str, seed: int) -> tuple[ExperimentConfig, Drift]:
    """One run's config with the drift planted (and ``replan_every`` for the re-planned row)."""
    base = base_config(args, ROWS[row], seed)
    data = base.model_dump(mode="json")
    if not data["data"]["groups"]:
        raise SystemExit("bench_drift needs a planted federation (data.groups)")
    rounds = base.federation.rounds
    drift = mirror_drift(
        data["data"]["groups"], data["data"]["dataset"], args.group, args.drift_round or rounds // 2 + 1
    )
    data["data"]["groups"], drift = split_drifting(data["data"]["groups"], drift, args.drifting)
    if row.startswith("fedtreelora-replan"):
        data["fedtreelora"]["replan_every"] = args.replan_every
        data["fedtreelora"]["replan_from"] = "uploads" if row.endswith("-uploads") else "updates"
    return validate_config(data), drift


def received_by_round(folder: Path) -> dict[int, dict[int, float]]:
    """round (0-based) -> client -> received accuracy, from the run folder's ``metrics.jsonl``."""
    out: dict[int, dict[int, float]] = {}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("received_accuracy") is not None:
            out.setdefault(int(record["round"]), {})[int(record["client"])] = float(record["received_accuracy"])
    return out


def group_scores(folder: Path, clients: Sequence[int], rounds: Sequence[int]) -> list[float]:
    """The mean received accuracy of ``clients`` at each of ``rounds`` (0-based)."""
    scores = received_by_round(folder)
    out = []
    for rnd in rounds:
        values = [scores[rnd][k] for k in clients if k in scores.get(rnd, {})]
        if not values:
            raise ValueError(f"{folder}: no received accuracy of clients {list(clients)} at round {rnd + 1}")
        out.append(float(np.mean(values)))
    return out


def plan_ari(summary: Mapping[str, Any], levels: list[list[str]], drift_round: int) -> tuple[list[float], list[float]]:
    """Per layer, the ARI with the deepest of ``levels`` (the planted groups after the drift) of the plan
    in force in round ``drift_round`` (0-based: the last made after an earlier round) and of the last
    plan, from the summary's ``plans`` (a run that planned once: its ``labels``, for both)."""
    plans = summary.get("plans") or []  # recorded when the run made more than one plan
    if not plans:
        if summary.get("labels") is None:
            raise ValueError("the summary records no sharing partition (not a FedTreeLoRA run?)")
        plans = [{"round": -1, "labels": summary["labels"]}]  # the one plan, built after warm-up
    before = [p for p in plans if p["round"] < drift_round][-1]
    deepest = [levels[-1]]
    return (
        ari_by_layer(np.asarray(before["labels"]), deepest)[:, 0].tolist(),
        ari_by_layer(np.asarray(plans[-1]["labels"]), deepest)[:, 0].tolist(),
    )


def cpu_model() -> str:
    """The CPU's model name as ``lscpu`` gives it, or what the platform says."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.strip().startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def layers(values: Sequence[Sequence[float]]) -> str:
    """Per layer, the mean over seeds, as ``0.12, 1.00, ...``."""
    return ", ".join(f"{v:.2f}" for v in np.mean(np.asarray(values, dtype=np.float64), axis=0))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--suite", default="planted-cpu", help="suite whose --dataset is the federation")
    parser.add_argument("--dataset", default="swap-in-tweets", help="the suite's federation")
    parser.add_argument(
        "--config", default=None, help="an experiment file instead of the suite ('quickstart': the default)"
    )
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--rounds", type=int, default=12, help="federation.rounds")
    parser.add_argument("--drift-round", type=int, default=None, help="1-based; default the middle round")
    parser.add_argument("--group", default=None, help="the drifting group (default: the first with a mirror)")
    parser.add_argument(
        "--drifting", type=int, default=None, help="how many of the group's clients drift (default: all of them)"
    )
    parser.add_argument("--replan-every", type=int, default=1, help="fedtreelora.replan_every of the re-planned row")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 4 rounds, seed 0 (checks the script)")
    parser.add_argument("--no-run", action="store_true", help="only tabulate finished runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.seeds = 4, [0]

    scores: dict[str, list[list[float]]] = {}
    ari: dict[str, tuple[list[list[float]], list[list[float]]]] = {}
    drift: Drift | None = None
    config: ExperimentConfig | None = None
    for row in args.rows:
        for seed in args.seeds:
            config, drift = experiment(args, row, seed)
            folder = args.out / f"{row}-seed{seed}"
            if args.no_run and not (folder / "summary.json").is_file():
                continue
            summary = run_one(config, folder)
            rounds = config.federation.rounds
            before = planted_groups(config.data)
            assert before is not None
            drifted = [k for k, name in enumerate(before) if name == drift.group]
            others = [k for k in range(len(before)) if k not in drifted]
            r0 = drift.round - 1
            mine = group_scores(folder, drifted, [r0 - 1, r0, rounds - 1])
            recovery = float(np.mean(group_scores(folder, drifted, list(range(r0, rounds)))))
            scores.setdefault(row, []).append([*mine, recovery, *group_scores(folder, others, [rounds - 1])])
            if row.startswith("fedtreelora"):
                after = planted_groups(config.data, rounds - 1)
                assert after is not None
                first, last = plan_ari(summary, planted_levels(after), r0)
                runs = ari.setdefault(row, ([], []))
                runs[0].append(first)
                runs[1].append(last)

    command = f"python benchmarks/bench_drift.py {' '.join(sys.argv[1:] if argv is None else argv)}"
    lines = [
        "# A planted federation whose groups change mid-run (drift)",
        "",
        f"Command: `{command}`; CPU: {cpu_model()}; date: {datetime.date.today().isoformat()}; seeds {args.seeds}.",
    ]
    if drift is not None and config is not None:
        source = args.config or f"suite {args.suite}, {args.dataset}"
        lines += [
            f"Federation: {source}, {config.data.num_clients} clients, {config.federation.rounds} rounds; group "
            f"{drift.group!r} (clients {[k for k, n in enumerate(planted_groups(config.data) or []) if n == drift.group]}) "
            f"takes the labels of {drift.name!r} ({json.dumps(drift.label_map)}) from round {drift.round}. "
            f"fedtreelora-replan(-uploads): replan_every={args.replan_every}, replan_from updates (uploads). Received accuracy %, mean ± sample std over seeds.",
            "",
            f"| method | drifted group, round {drift.round - 1} (before) | round {drift.round} (swap) | "
            f"round {config.federation.rounds} (end) | mean of rounds {drift.round}-{config.federation.rounds} | "
            f"other clients, round {config.federation.rounds} |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for row, values in scores.items():
            lines.append(f"| {row} | " + " | ".join(cell([v[i] for v in values]) for i in range(5)) + " |")
        if ari:
            lines += [
                "",
                "FedTreeLoRA: ARI per layer (mean over seeds) of the sharing partition with the groups after the "
                "drift (deepest planted depth), for the plan in force when the labels swap and for the last plan:",
                "",
                "| run | plan in force at the swap | last plan |",
                "|---|---|---|",
            ]
            for row, (first, last) in ari.items():
                lines.append(f"| {row} | {layers(first)} | {layers(last)} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "drift.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
