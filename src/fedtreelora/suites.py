"""Benchmark suites: versioned YAML files that fix the datasets, methods, seeds and protocol of a comparison.

Where suites live
-----------------
The suites shipped with the project are in ``src/fedtreelora/configs/suites/`` (inside the package, so the
same files are found from a source checkout and from an installed wheel). :func:`find_suite` resolves
``--suite X`` in this order:

1. ``X`` is an existing file: that file (any suite of your own, anywhere);
2. ``./configs/suites/X.yaml`` under the current directory: a project-local suite (shadows a packaged one);
3. ``<package>/configs/suites/X.yaml``: a packaged suite (``nlu-smoke``, ``nlu``, ``nlu-paper``).

File format (``version: 1``)
----------------------------
::

    version: 1                 # format version of this file
    name: nlu-smoke
    description: one paragraph on what the suite is for
    methods: all               # or a list of method names; ``all`` = every registered method
    seeds: [1, 2, 3]
    warmup_rounds: 3           # optional: set as <method>.warmup_rounds for every method that warms up by default
    base:                      # a config (as in `fedtreelora run --config`) applied to every run
      model: {num_layers: 2}
      federation: {rounds: 15}
    datasets:                  # dataset label -> config overrides, merged over base
      sarcasm: {data: {dataset: sarcasm, n_train: 500}}
    method_overrides:          # optional: method -> config overrides, merged over base + dataset
      fedit: {fedit: {weighting: examples}}
    variants:                  # optional: named table rows, each a method with its own option overrides
      tau-0.1: {method: fedtreelora, overrides: {fedtreelora: {tau: 0.1}}}

A variant is listed in ``methods`` (or ``--methods``) by its name, like a method; its runs use the
variant's method with the method's overrides, then the variant's. Variants make a sensitivity sweep one
comparison (``nlu-sweep``): every row sees the same partitions.

A run's configuration is, deepest last: the config defaults, ``base``, the dataset's overrides, the
suite-wide ``warmup_rounds``, the method's overrides, the command line's ``--set`` values, then
``method`` and ``seed``. Method overrides must not touch the ``data`` section (every method of one
(dataset, seed) must see the same partition).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedtreelora.config import ConfigError, ExperimentConfig, apply_override, validate_config
from fedtreelora.strategies.registry import METHODS, table_order

PACKAGED_SUITES = Path(__file__).resolve().parent / "configs" / "suites"
"""Folder of the suites that ship with the package."""

LOCAL_SUITES = Path("configs") / "suites"
"""Folder (relative to the current directory) searched before the packaged suites."""

_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class VariantFile(BaseModel):
    """One named row of a comparison: a method run with extra config overrides."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    method: str
    """The registered method the variant runs."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Config overrides of this row (e.g. ``{fedtreelora: {tau: 0.1}}``); never ``data`` or ``seed``."""


class SuiteFile(BaseModel):
    """The schema of a suite file (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    version: Literal[1] = 1
    """Format version of the suite file."""
    name: str
    """Suite name (what ``--suite`` accepts)."""
    description: str = ""
    """What the suite is for and how long it takes."""
    methods: Literal["all"] | list[str] = "all"
    """Methods run by default: ``all`` (every registered method) or a list of names."""
    seeds: list[int] = Field(default_factory=lambda: [1], min_length=1)
    """Seeds run by default."""
    warmup_rounds: int | None = Field(None, ge=0)
    """Warm-up rounds, set as ``<method>.warmup_rounds`` for every method that warms up by default (FedIT's
    optional warm-up, default 0, stays off)."""
    base: dict[str, Any] = Field(default_factory=dict)
    """Config applied to every run."""
    datasets: dict[str, dict[str, Any]] = Field(min_length=1)
    """Dataset label -> config overrides (typically the ``data`` section and per-dataset sizes)."""
    method_overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Method name -> config overrides for that method's runs only (never the ``data`` section)."""
    variants: dict[str, VariantFile] = Field(default_factory=dict)
    """Row name -> a method and option overrides (e.g. one value of a swept option)."""

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, value: dict[str, VariantFile]) -> dict[str, VariantFile]:
        for name, variant in value.items():
            if not _LABEL.match(name) or name in METHODS:
                raise ValueError(
                    f"variant name {name!r} must be letters, digits, '_', '.', '-' (it names a folder) and not a "
                    "registered method's name"
                )
            if "data" in variant.overrides or "seed" in variant.overrides:
                raise ValueError(f"variants.{name} sets 'data' or 'seed': every row must see the same partition")
        return value

    @field_validator("datasets")
    @classmethod
    def _labels(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for label, overrides in value.items():
            if not _LABEL.match(label) or label.lower() == "average":
                raise ValueError(
                    f"dataset label {label!r} must be letters, digits, '_', '.', '-' (it names a folder) "
                    "and not 'Average' (a table column)"
                )
            if overrides is not None and not isinstance(overrides, dict):
                raise ValueError(f"datasets.{label} must be a mapping of config overrides")
        return {label: overrides or {} for label, overrides in value.items()}

    @field_validator("method_overrides")
    @classmethod
    def _no_data(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for method, overrides in value.items():
            if "data" in (overrides or {}) or "seed" in (overrides or {}):
                raise ValueError(
                    f"method_overrides.{method} sets 'data' or 'seed': every method of one (dataset, seed) must "
                    "see the same partition; put data settings in base or datasets"
                )
        return {method: overrides or {} for method, overrides in value.items()}


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A new dict: ``base`` with ``overrides`` merged in, mappings recursively, other values replaced."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def order_methods(names: list[str] | tuple[str, ...]) -> list[str]:
    """Methods in the paper's table order: reference points and baselines first, FedTreeLoRA last
    (:func:`fedtreelora.strategies.table_order`; variants come after the baselines)."""
    return table_order(names)


@dataclass(frozen=True)
class Suite:
    """A loaded suite: the file's content plus where it came from."""

    name: str
    description: str
    path: Path | None
    base: dict[str, Any]
    datasets: dict[str, dict[str, Any]]
    methods: tuple[str, ...] | None
    """Default methods; None means every registered method."""
    seeds: tuple[int, ...]
    warmup_rounds: int | None = None
    method_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    variants: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    """Row name -> (method, overrides)."""

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: Path | None = None) -> Suite:
        """Validate a suite mapping (as read from YAML); :class:`ConfigError` names each bad key."""
        where = f" ({path})" if path is not None else ""
        try:
            parsed = SuiteFile.model_validate(data)
        except ValidationError as exc:
            lines = [f"{'.'.join(str(p) for p in e['loc']) or 'suite'}: {e['msg']}" for e in exc.errors()]
            raise ConfigError(f"invalid suite{where}:\n  " + "\n  ".join(lines)) from None
        return cls(
            name=parsed.name,
            description=parsed.description.strip(),
            path=path,
            base=parsed.base,
            datasets=parsed.datasets,
            methods=None if parsed.methods == "all" else tuple(parsed.methods),
            seeds=tuple(parsed.seeds),
            warmup_rounds=parsed.warmup_rounds,
            method_overrides=parsed.method_overrides,
            variants={name: (v.method, v.overrides) for name, v in parsed.variants.items()},
        )

    def default_methods(self) -> list[str]:
        """The suite's methods (every registered one for ``methods: all``), in table order."""
        if self.methods is None:
            return order_methods(list(METHODS))
        if any(m in self.variants for m in self.methods):
            return list(dict.fromkeys(self.methods))  # a sweep reads in the order its file lists it
        return order_methods(list(self.methods))

    def check_methods(self, methods: list[str] | tuple[str, ...]) -> None:
        """Raise :class:`ConfigError` for a name that is neither a registered method nor a variant."""
        unknown = [m for m in methods if m not in METHODS and m not in self.variants]
        if unknown:
            extra = f"; this suite's variants: {sorted(self.variants)}" if self.variants else ""
            raise ConfigError(f"unknown method(s) {unknown}; registered: {sorted(METHODS)}{extra}")
        bad = sorted({m for m, _ in self.variants.values()} - set(METHODS))
        if bad:
            raise ConfigError(f"variants use unknown method(s) {bad}; registered: {sorted(METHODS)}")

    def method_of(self, row: str) -> str:
        """The registered method a table row (a method or a variant name) runs."""
        return self.variants[row][0] if row in self.variants else row

    def config_dict(
        self, method: str, dataset: str, seed: int, overrides: list[str] | tuple[str, ...] = ()
    ) -> dict[str, Any]:
        """The unvalidated config mapping of one run (see the module docstring for the order)."""
        if dataset not in self.datasets:
            raise ConfigError(f"suite {self.name!r} has no dataset {dataset!r}; it has {list(self.datasets)}")
        self.check_methods([method])
        row, method = method, self.method_of(method)
        data = deep_merge(self.base, self.datasets[dataset])
        options = METHODS[method].options
        # Only methods whose warm-up is part of the method (on by default: FedTreeLoRA, FedLEASE); FedIT's
        # optional warm-up stays off, so FedIT in a suite is FedAvg from the first round, as in the papers.
        field = options.model_fields.get("warmup_rounds")
        if self.warmup_rounds is not None and field is not None and (field.default or 0) > 0:
            data = deep_merge(data, {method: {"warmup_rounds": self.warmup_rounds}})
        data = deep_merge(data, self.method_overrides.get(method, {}))
        if row in self.variants:
            data = deep_merge(data, self.variants[row][1])
        for assignment in overrides:
            apply_override(data, assignment)
        data["method"] = method
        data["seed"] = seed
        return data

    def resolve(
        self, method: str, dataset: str, seed: int, overrides: list[str] | tuple[str, ...] = ()
    ) -> ExperimentConfig:
        """The validated config of one run; :class:`ConfigError` says which run and key is wrong."""
        try:
            return validate_config(self.config_dict(method, dataset, seed, overrides))
        except ConfigError as exc:
            raise ConfigError(f"suite {self.name!r}, dataset {dataset!r}, method {method!r}: {exc}") from None

    def validate(self, methods: list[str] | tuple[str, ...] | None = None) -> list[ExperimentConfig]:
        """Resolve every (dataset, method, first seed) and check partitions agree across methods.

        Method overrides for methods that are not registered are errors. Returns the configs.
        """
        self.check_methods(list(self.method_overrides))
        methods = self.default_methods() if methods is None else list(methods)
        configs = []
        for dataset in self.datasets:
            resolved = [self.resolve(m, dataset, self.seeds[0]) for m in methods]
            check_same_partition(resolved, f"suite {self.name!r}, dataset {dataset!r}")
            configs.extend(resolved)
        return configs


def check_same_partition(configs: list[ExperimentConfig], where: str) -> None:
    """Raise :class:`ConfigError` unless every config has the same ``data`` section and seed, the only
    inputs of the client partition (so every method is compared on the same clients)."""
    if not configs:
        return
    first = configs[0]
    reference = (first.data.model_dump(mode="json"), first.seed)
    for config in configs[1:]:
        if (config.data.model_dump(mode="json"), config.seed) != reference:
            raise ConfigError(
                f"{where}: methods {first.method!r} and {config.method!r} would see different partitions "
                "(their data section or seed differ); data settings must be the same for every method"
            )


def available_suites() -> dict[str, Path]:
    """Suite name -> file, packaged suites overridden by ``./configs/suites`` ones of the same name."""
    found: dict[str, Path] = {}
    for folder in (PACKAGED_SUITES, LOCAL_SUITES):
        if folder.is_dir():
            for path in sorted(folder.glob("*.yaml")):
                found[path.stem] = path
    return dict(sorted(found.items()))


def find_suite(name_or_path: str | Path) -> Path:
    """The suite file for ``name_or_path``: an existing file, ``./configs/suites/NAME.yaml``, or a packaged suite."""
    candidate = Path(name_or_path).expanduser()
    if candidate.is_file():
        return candidate
    name = str(name_or_path)
    if name.endswith(".yaml"):
        name = name[: -len(".yaml")]
    for folder in (LOCAL_SUITES, PACKAGED_SUITES):
        path = folder / f"{name}.yaml"
        if path.is_file():
            return path
    names = ", ".join(available_suites()) or "none"
    raise ConfigError(
        f"no suite {str(name_or_path)!r}: not a file, and not in ./{LOCAL_SUITES} or {PACKAGED_SUITES}; "
        f"available suites: {names}"
    )


def load_suite(name_or_path: str | Path) -> Suite:
    """Find, read and validate a suite (its runs' configs are validated when resolved)."""
    path = find_suite(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"suite file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"suite file {path} must hold a mapping at the top level")
    return Suite.from_dict(data, path)
