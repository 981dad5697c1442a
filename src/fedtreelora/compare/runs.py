"""Planning and reusing the runs of ``fedtreelora compare``: one :class:`RunSpec` per (dataset, seed,
method), each reused, resumed or (re)run (see :mod:`fedtreelora.compare` for the rules), and the checks
on disk that every method of one (dataset, seed) saw the same partition."""

from __future__ import annotations

import gc
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedtreelora.compare.stats import RunKey
from fedtreelora.config import ConfigError, ExperimentBase, ExperimentConfig
from fedtreelora.data.groups import configured_dataset_name
from fedtreelora.runfolder import ComparisonFolder, RunFolder, RunSummary
from fedtreelora.suites import Suite, check_same_partition


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
    summary: RunSummary
    """The run's summary (a plain mapping given here is read as one)."""
    status: str
    """``reused`` (read back), ``resumed`` (from a checkpoint), ``new``, or ``rerun`` (its folder held a
    run of another config, deleted first)."""
    seconds: float

    def __post_init__(self) -> None:
        if not isinstance(self.summary, RunSummary):
            self.summary = RunSummary(self.summary)

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


def run_folder(out: str | Path, dataset: str, method: str, seed: int) -> Path:
    """``out/runs/<dataset>/<method>/seed<seed>`` (:meth:`fedtreelora.runfolder.ComparisonFolder.run`)."""
    return ComparisonFolder(Path(out)).run(dataset, method, seed).root


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


def _read_summary(folder: Path) -> RunSummary | None:
    """The summary of a finished run in ``folder``; None when it has none or it lacks the headline. A
    summary written before the best federated round was recorded gets it from its history and metrics
    (:meth:`fedtreelora.runfolder.RunFolder.read_complete_summary`)."""
    summary = RunFolder(folder).read_complete_summary()
    return None if summary is None or not summary.has_headline else summary


def _differing_keys(stored: Any, wanted: Any, prefix: str = "") -> list[str]:
    """Dotted keys at which two ``comparable`` dicts differ (a key missing on one side differs)."""
    if isinstance(stored, dict) and isinstance(wanted, dict):
        keys = sorted(set(stored) | set(wanted))
        return [d for k in keys for d in _differing_keys(stored.get(k), wanted.get(k), f"{prefix}{k}.")]
    return [] if stored == wanted else [prefix.rstrip(".")]


def finished_runs_of_other_configs(specs: Sequence[RunSpec]) -> list[tuple[RunSpec, list[str]]]:
    """The specs whose folder holds a *finished* run (a summary with the headline) of another config,
    each with the dotted keys at which the stored config differs (``["config"]`` when it no longer loads)."""
    found: list[tuple[RunSpec, list[str]]] = []
    for spec in specs:
        if _read_summary(spec.folder) is None or stored_config_matches(spec.folder, spec.config):
            continue
        try:
            keys = _differing_keys(comparable(RunFolder(spec.folder).read_config()), comparable(spec.config))
        except (ConfigError, ValueError, yaml.YAMLError):
            keys = ["config"]
        found.append((spec, keys or ["config"]))
    return found


def check_nothing_finished_is_replaced(specs: Sequence[RunSpec]) -> None:
    """Raise :class:`ConfigError` when a planned run would delete a finished run of another config.

    A comparison reuses a folder's run only when its config matches; a forgotten ``--set`` (say the
    precision the runs were made with) would otherwise delete every finished run it meets and train it
    again. Checked for all runs before any is touched, so nothing is lost and nothing is half done.
    """
    found = finished_runs_of_other_configs(specs)
    if not found:
        return
    lines = [
        f"  {spec.folder}: differs at {', '.join(keys[:4])}" + (" ..." if len(keys) > 4 else "")
        for spec, keys in found[:5]
    ]
    more = f"\n  ... and {len(found) - 5} more" if len(found) > 5 else ""
    raise ConfigError(
        f"{len(found)} finished run(s) in this output folder were made with another config:\n"
        + "\n".join(lines)
        + more
        + "\nPass the same --set overrides as the command that made them (table.md records it), choose "
        "another --out, or pass --replace to delete them and run them again."
    )


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

    written = SimulationEngine(spec.config, spec.folder, quiet=True, resume=matches).run()
    gc.collect()
    return RunResult(spec, RunSummary(written), status, time.perf_counter() - start)


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
