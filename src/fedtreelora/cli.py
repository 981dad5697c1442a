"""``fedtreelora`` command line: run an experiment, list methods and datasets."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from fedtreelora.config import load_config, load_run_config
from fedtreelora.errors import ConfigError
from fedtreelora.runfolder import CLIENT_MODELS, ClientModel, Headline, RunFolder, RunSummary

DEFAULT_OUT = "runs/default"


def _federated_text(values: Headline, with_round: bool) -> str:
    """``best federated 0.7708 (round 6)``: the best round after warm-up, or ``-`` when the run has none."""
    best, rnd = values.best_federated_mean, values.best_federated_round
    if best is None or rnd is None:
        return "best federated -"
    return f"best federated {best:.4f}" + (f" (round {rnd + 1})" if with_round else "")


def result_line(summary: Mapping[str, Any], out: Path) -> str:
    """The line ``fedtreelora run`` ends with: the headline convention's final mean, best round (as the
    papers report it, possibly a warm-up round) and best federated round (the best after warm-up), the
    other convention's three, the epsilons with privacy on, the cuts, the wall time and the run folder."""
    run = RunSummary(summary)
    ours, other = run.headline, run.evaluate.other
    aside = run.by_convention(other)
    return (
        f"{run.method} on {run.dataset}: final mean {run.metric} {run.evaluate.scored} "
        f"{_number(ours.final_mean)}, best {_number(ours.best_mean)} (round {_round(ours.best_round)}), "
        f"{_federated_text(ours, True)}; "
        + (
            f"{other.scored}: final {_number(aside.final_mean)}, best {_number(aside.best_mean)}, "
            f"{_federated_text(aside, False)}; "
            if aside is not None
            else ""
        )
        + _privacy_text(run)
        + f"cuts {run.cuts}, {_number(run.wall_seconds, '.0f')} s -> {out}"
    )


def _privacy_text(run: RunSummary) -> str:
    """``privacy: epsilon 6.48 (9.01 against the server) at delta 1e-05; `` with privacy on (the server's
    epsilon only where it differs), ``""`` without."""
    privacy = run.privacy
    if privacy is None:
        return ""
    eps, server = privacy.epsilon, privacy.epsilon_server
    text = f"privacy: epsilon {_epsilon(eps)}"
    if server != eps:
        text += f" ({_epsilon(server)} against the server)"
    return text + ("" if privacy.delta is None else f" at delta {privacy.delta:g}") + "; "


def _epsilon(value: float | None) -> str:
    """An epsilon as the run's last line shows it; ``unbounded`` for None (no noise: no guarantee)."""
    return "unbounded" if value is None else f"{value:.2f}"


def flower_result_line(summary: Mapping[str, Any], out: Path) -> str:
    """The line ``fedtreelora flower simulate`` ends with: the final and best round's mean, the epsilons
    with privacy on, the cuts and the run folder."""
    run = RunSummary(summary)
    return (
        f"{run.method} on {run.dataset} (Flower simulation, {run.num_clients} nodes): "
        f"final mean {run.metric} {_number(run.final_mean)}, best {_number(run.best_mean)}, "
        + _privacy_text(run)
        + f"cuts {run.cuts} -> {out}"
    )


def _number(value: float | None, spec: str = ".4f") -> str:
    """``value`` formatted, ``-`` when the run has none."""
    return "-" if value is None else format(value, spec)


def _round(value: int | None) -> str:
    """A 0-based round as shown (1-based), ``-`` when the run has none."""
    return "-" if value is None else str(value + 1)


def _run(args: argparse.Namespace) -> int:
    overrides = list(args.set or [])
    if args.resume is not None:
        if args.config or overrides or args.method or args.seed is not None:
            raise ConfigError("--resume continues with the run's own config.yaml; drop --config/--set/--method/--seed")
        out = Path(args.resume)
        run = RunFolder(out)
        if not run.config.is_file():
            raise ConfigError(f"--resume {str(out)!r}: no {run.config.name} there; is it a run folder?")
        config = run.read_config()
    else:
        config = load_run_config(args.config, overrides, method=args.method, seed=args.seed)
        out = Path(args.out)
    from fedtreelora.engines import SimulationEngine  # heavy imports only when running

    summary = SimulationEngine(config, out, quiet=args.quiet, resume=args.resume is not None).run()
    print(result_line(summary, out))
    finding = RunSummary(summary).finding
    if args.quiet and finding:
        # A quiet run shows no round lines, so the one-off finding of its plan round comes with the result.
        print(finding)
    return 0


def _methods(_: argparse.Namespace) -> int:
    from fedtreelora.strategies.registry import METHODS, table_order  # the descriptions only: no torch

    for name in table_order(list(METHODS)):  # the order of the tables and docs
        print(f"{name:<12} {METHODS[name].paper}")
    return 0


def _datasets(_: argparse.Namespace) -> int:
    from fedtreelora.data import BUILTIN_SOURCES

    for name, description in BUILTIN_SOURCES.items():
        print(f"{name:<12} {description}")
    print("or: a .csv/.tsv/.jsonl/.json/.parquet file, a local dataset folder, or a Hugging Face hub id")
    return 0


def _show_config(args: argparse.Namespace) -> int:
    from fedtreelora.config import dump_config

    if args.reference:
        from fedtreelora.config import config_reference

        print(config_reference(), end="")
        return 0
    config = load_run_config(args.config, list(args.set or []), method=args.method, seed=args.seed)
    print(dump_config(config), end="")
    return 0


def _report(args: argparse.Namespace) -> int:
    from fedtreelora.report import write_report

    try:
        html_path, md_path = write_report(args.run_dir)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {html_path} and {md_path}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from fedtreelora.export import export_client, export_trunk

    # ExportError (a run that cannot be exported as asked) is a ConfigError: one line, exit 2.
    if args.trunk:
        if args.client is not None or args.model is not None:
            raise ConfigError("--trunk exports the trunk shared by all clients; drop --client and --model")
        out = export_trunk(args.run_dir, args.out)
        print(f"wrote the shared trunk of {args.run_dir} as a PEFT LoRA adapter to {out}")
        return 0
    if args.client is None:
        raise ConfigError("name the client to export with --client K (or export the shared trunk with --trunk)")
    model: ClientModel = args.model or "received"
    out = export_client(args.run_dir, args.client, args.out, model=model)
    what = "received model" if model == "received" else "model after local training"
    print(f"wrote client {args.client}'s {what} of {args.run_dir} as a PEFT LoRA adapter to {out}")
    return 0


_Item = TypeVar("_Item", int, str)


def _csv_list(text: str | None, kind: type[_Item]) -> list[_Item] | None:
    """``a,b,c`` as a list (None stays None); ``kind`` (``int`` or ``str``) converts each item."""
    if text is None:
        return None
    try:
        return [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"expected a comma-separated list of {kind.__name__}, got {text!r}") from None


def _compare_command(args: argparse.Namespace, out: Path) -> str:
    """The comparison's command line, as recorded in its table."""
    parts = ["fedtreelora compare", f"--suite {args.suite}"]
    parts += [f"--{name} {getattr(args, name)}" for name in ("methods", "seeds", "datasets") if getattr(args, name)]
    parts += [f"--set {assignment}" for assignment in args.set or []]
    return " ".join([*parts, f"--out {out}"])


def _compare(args: argparse.Namespace) -> int:
    from fedtreelora.compare import run_compare
    from fedtreelora.suites import load_suite

    suite = load_suite(args.suite)
    out = Path(args.out or f"runs/compare-{suite.name}")
    result = run_compare(
        suite,
        out,
        methods=_csv_list(args.methods, str),
        seeds=_csv_list(args.seeds, int),
        datasets=_csv_list(args.datasets, str),
        overrides=list(args.set or []),
        quiet=args.quiet,
        command=_compare_command(args, out),
        replace=args.replace,
    )
    print(result.files["table.md"].read_text(), end="")
    written = ", ".join(str(p) for p in result.files.values())
    print(f"\n{len(result.executed)} run(s) trained, {len(result.reused)} reused; wrote {written}")
    return 0


def _flower_simulate(args: argparse.Namespace) -> int:
    from fedtreelora.engines.flower.launch import simulate

    # The same experiment as `fedtreelora run` with the same options (the quickstart without --config).
    config = load_run_config(args.config, list(args.set or []), method=args.method, seed=args.seed)
    out = Path(args.out)
    summary = simulate(config, out, round_timeout=args.round_timeout, echo=not args.quiet)
    print(flower_result_line(summary, out))
    return 0


def _flower_app(args: argparse.Namespace) -> int:
    from fedtreelora.engines.flower.project import write_app
    from fedtreelora.engines.flower.settings import FlowerRunSettings

    config = load_config(args.config, list(args.set or []), method=args.method, seed=args.seed)
    settings = FlowerRunSettings.for_experiment(
        config,
        out_dir=Path(args.run_dir).resolve() if args.run_dir else None,
        round_timeout=args.round_timeout,
        node_wait_timeout=args.node_wait_timeout,
        collect_states=not args.keep_states_on_nodes,
    )
    folder = write_app(settings, args.out)
    print(f"wrote the Flower app to {folder}; start it with `flwr run {folder} <superlink-connection> --stream`")
    return 0


def _flower_credentials(args: argparse.Namespace) -> int:
    from fedtreelora.engines.flower.certs import make_credentials

    creds = make_credentials(args.out, num_nodes=args.nodes, hosts=tuple(args.host or ("localhost", "127.0.0.1")))
    print(f"wrote a test CA ({creds.ca_cert}), the SuperLink certificate and key, and {args.nodes} SuperNode key pairs")
    return 0


def _flower_sites(args: argparse.Namespace) -> int:
    from fedtreelora.engines.flower.sites import write_sites

    config = load_config(args.config, list(args.set or []), method=args.method, seed=args.seed)
    folders = write_sites(config, args.out)
    files = ", ".join(sorted(f.name for f in folders[0].iterdir())) if folders else ""
    print(f"wrote {len(folders)} site folders under {args.out} ({files} each)")
    return 0


def _add_flower(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    config_options: Callable[[argparse.ArgumentParser], None],
) -> None:
    flower = sub.add_parser("flower", help="run on Flower: its simulation engine, or a deployment across machines")
    fsub = flower.add_subparsers(dest="flower_command", required=True)

    sim = fsub.add_parser("simulate", help="run an experiment in Flower's simulation engine (one node per client)")
    config_options(sim)
    sim.add_argument("--out", default="runs/flower", help="output folder (default runs/flower)")
    sim.add_argument("--round-timeout", type=float, help="seconds to wait for a round's replies (default: all)")
    sim.add_argument("--quiet", action="store_true", help="do not stream the run's log")
    sim.set_defaults(func=_flower_simulate)

    app = fsub.add_parser("app", help="write a Flower app folder for an experiment (to `flwr run` on a SuperLink)")
    config_options(app)
    app.add_argument("--out", required=True, metavar="APP_DIR", help="folder for the app's pyproject.toml")
    app.add_argument("--run-dir", help="folder on the SuperLink machine for the run's outputs")
    app.add_argument("--round-timeout", type=float, help="seconds to wait for a round's replies (default: all)")
    app.add_argument("--node-wait-timeout", type=float, default=120.0, help="seconds to wait for nodes at start")
    app.add_argument(
        "--keep-states-on-nodes", action="store_true", help="do not collect the final personal adapters at the end"
    )
    app.set_defaults(func=_flower_app)

    sites = fsub.add_parser(
        "sites", help="write each client's share of the partition as a site folder (to try a deployment)"
    )
    config_options(sites)
    sites.add_argument("--out", required=True, help="folder for site0, site1, ...")
    sites.set_defaults(func=_flower_sites)

    creds = fsub.add_parser("credentials", help="make a test CA, a SuperLink TLS certificate and SuperNode keys")
    creds.add_argument("--out", required=True, help="folder for the files")
    creds.add_argument("--nodes", type=int, default=3, help="SuperNode key pairs to make (default 3)")
    creds.add_argument(
        "--host",
        action="append",
        help="a name or IP the SuperLink is reached by (repeatable; default localhost, 127.0.0.1)",
    )
    creds.set_defaults(func=_flower_credentials)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtreelora",
        description="Personalized federated LoRA fine-tuning: FedTreeLoRA and the methods it is compared with.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def config_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, help="YAML config file (see configs/)")
        p.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help="override one key, e.g. fedtreelora.tau=0.2 (repeatable)",
        )
        p.add_argument("--method", help="federated method (see `fedtreelora methods`)")
        p.add_argument("--seed", type=int, help="seed of partition, initialisation, batching and dropout")

    run = sub.add_parser("run", help="run one federated experiment (defaults: MiniLM on sarcasm, 10 clients)")
    config_options(run)
    run.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    run.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bars or per-round lines (the clusters' finding comes with the result)",
    )
    run.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    run.set_defaults(func=_run)

    show = sub.add_parser("config", help="print the resolved configuration")
    config_options(show)
    show.add_argument("--reference", action="store_true", help="print the reference of every key (markdown)")
    show.set_defaults(func=_show_config)

    sub.add_parser("methods", help="list the federated methods").set_defaults(func=_methods)
    sub.add_parser("datasets", help="list the built-in datasets").set_defaults(func=_datasets)

    report = sub.add_parser("report", help="write report.html and report.md for a finished run")
    report.add_argument("run_dir", metavar="RUN_DIR", help="the run's output folder")
    report.set_defaults(func=_report)

    export = sub.add_parser("export", help="export a client's personalized model (or the shared trunk) for PEFT")
    export.add_argument("run_dir", metavar="RUN_DIR", help="the run's output folder")
    export.add_argument("--client", type=int, metavar="K", help="client to export (from 0)")
    export.add_argument("--out", required=True, metavar="ADAPTER_DIR", help="folder for the PEFT adapter")
    export.add_argument(
        "--model",
        choices=CLIENT_MODELS,
        help="which of the client's models: received (default; its kept state plus the server's last payload, "
        "scored as received_accuracy) or trained (after its last local training, scored as accuracy)",
    )
    export.add_argument("--trunk", action="store_true", help="export the trunk shared by all clients instead")
    export.set_defaults(func=_export)

    compare = sub.add_parser(
        "compare", help="run every method of a benchmark suite on the same partitions and write the tables"
    )
    compare.add_argument(
        "--suite",
        required=True,
        help="suite name (cpu, nlu-cpu, nlu-cpu-tree, depth, nlu-smoke, nlu, nlu-sweep, nlu-paper, nlg-smoke, nlg, nlg-paper; in "
        "src/fedtreelora/configs/suites/) or a suite YAML file",
    )
    compare.add_argument("--methods", metavar="A,B,...", help="methods to run (default: the suite's, usually all)")
    compare.add_argument("--seeds", metavar="1,2,...", help="seeds to run (default: the suite's)")
    compare.add_argument("--datasets", metavar="A,B,...", help="dataset labels of the suite to run (default: all)")
    compare.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override one key in every run, e.g. train.lr=1e-3"
    )
    compare.add_argument("--out", help="output folder (default runs/compare-<suite>); finished runs in it are reused")
    compare.add_argument("--quiet", action="store_true", help="no progress bar (one line per run is still printed)")
    compare.add_argument(
        "--replace",
        action="store_true",
        help="delete and rerun finished runs in --out made with another config (without it they are an error)",
    )
    compare.set_defaults(func=_compare)
    _add_flower(sub, config_options)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, ValidationError) as exc:
        # Only the user's configuration or input; any other error is a bug and keeps its traceback.
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
