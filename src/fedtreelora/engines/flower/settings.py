"""The keys a fedtreelora Flower app reads from Flower's run config and node config.

Run config (``[tool.flwr.app.config]`` of the app's ``pyproject.toml``, or ``flwr run --run-config``):

* the experiment, one flat key per setting: ``method``, ``seed``, ``rounds`` (``federation.rounds``)
  and ``SECTION.KEY`` for every other key of the experiment config (``train.lr``, ``data.num_clients``,
  ``fedtreelora.tau``...; the names of ``fedtreelora config``). A key left out takes its default. A
  value Flower cannot hold (run-config values are strings, numbers and booleans) travels as JSON text:
  a list or mapping (``model.target_modules = '["query", "value"]'``, ``data.groups``) or none
  (``model.num_layers = "null"``); such text is read as JSON only for a key whose setting takes a
  list, a mapping or none.
* ``out-dir``: the run folder the ServerApp writes (metrics, summary...; see :mod:`fedtreelora.runfolder`; "" for none).
* ``round-timeout``: seconds the server waits for a round's replies; clients that have not answered
  by then miss the round (stragglers) and keep their previous state. 0 waits for every reply.
* ``node-wait-timeout``: seconds the server waits at start for every client's node to connect.
* ``collect-states``: whether the nodes send their final personal adapters at the end of the run (so
  ``fedtreelora export`` works on the server's folder); false keeps them on the nodes only.

The experiment is validated as ``fedtreelora run`` validates it (:func:`fedtreelora.config.validate_config`,
where :func:`~fedtreelora.config.load_config` ends), so a bad key or value reads the same on both engines.

Node config (``flower-supernode --node-config``):

* simulation: ``partition-id`` (set by Flower) is the client id in the configured partition;
* deployment: ``client-id`` (0..N-1, stable across runs) and ``data``, the site's own dataset
  (a file or folder readable by ``data.dataset``; its ``validation`` split or a held-out share).
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from fedtreelora.config import ConfigError, ExperimentConfig, experiment_config_model, set_path, validate_config

#: the run-config keys of the Flower side (every other key is a setting of the experiment)
FLOWER_KEYS = ("out-dir", "round-timeout", "node-wait-timeout", "collect-states")
#: the run-config key of ``federation.rounds``
ROUNDS_KEY = "rounds"

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")
_SCALARS = (bool, int, float, str)


def _run_bool(run_config: Mapping[str, Any], key: str, default: bool) -> bool:
    """A boolean run-config value; strings are parsed strictly, since ``bool("false")`` is True."""
    value = run_config.get(key, default)
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"the Flower run config's {key!r} must be a boolean (true/false, 1/0 or yes/no), got {value!r}")


def experiment_to_run_config(experiment: ExperimentConfig) -> dict[str, bool | int | float | str]:
    """The experiment as flat run-config keys: ``method``, ``seed``, ``rounds`` and ``SECTION.KEY``.

    Scalars stay as they are; lists, mappings and None become JSON text.
    """
    flat: dict[str, bool | int | float | str] = {}
    for name, value in experiment.model_dump(mode="json").items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for key, item in items:
            flat_key = name if key is None else f"{name}.{key}"
            if flat_key == "federation.rounds":
                flat_key = ROUNDS_KEY
            flat[flat_key] = item if isinstance(item, _SCALARS) else json.dumps(item)
    return flat


def _takes_structure(annotation: Any) -> bool:
    """Whether a setting of this type takes a list, a mapping or None (values that travel as JSON text)."""
    if annotation is None or annotation is type(None):
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_takes_structure(arg) for arg in typing.get_args(annotation))
    if origin in (list, dict, tuple) or annotation in (list, dict, tuple):
        return True
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _setting_type(model: type[BaseModel], path: list[str]) -> Any:
    """The annotation of the setting at ``path`` (``["train", "lr"]``), or None for an unknown key."""
    annotation: Any = model
    for part in path:
        if (
            not (isinstance(annotation, type) and issubclass(annotation, BaseModel))
            or part not in annotation.model_fields
        ):
            return None
        annotation = annotation.model_fields[part].annotation
    return annotation


def experiment_from_run_config(run_config: Mapping[str, Any]) -> ExperimentConfig:
    """Rebuild and validate the experiment from the flat keys of a run config (Flower's keys ignored).

    Raises:
        ConfigError: as ``fedtreelora run`` would for the same settings (an unknown key names itself
            and the valid keys of its section).
    """
    if "experiment" in run_config:
        raise ConfigError(
            "the Flower run config has an 'experiment' key (the whole experiment as JSON), which is no longer "
            "read: the experiment travels as flat keys (method, rounds, train.lr...); rewrite the app with "
            "`fedtreelora flower app --config FILE --out APP_DIR`"
        )
    if ROUNDS_KEY in run_config and "federation.rounds" in run_config:
        raise ConfigError("the Flower run config sets both 'rounds' and 'federation.rounds'; keep one ('rounds')")
    model = experiment_config_model()
    data: dict[str, Any] = {}
    for flat_key, value in run_config.items():
        if flat_key in FLOWER_KEYS:
            continue
        path = ["federation", "rounds"] if flat_key == ROUNDS_KEY else flat_key.split(".")
        if isinstance(value, str) and _takes_structure(_setting_type(model, path)):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                parsed = value
            if parsed is None or isinstance(parsed, (list, dict)):
                value = parsed
        set_path(data, path, value, where=f"the Flower run config's {flat_key!r}")
    # The same validation as `fedtreelora run`, so a bad key reads the same on both engines.
    return validate_config(data)


@dataclass(frozen=True)
class FlowerRunSettings:
    """A run as the ServerApp and ClientApp see it."""

    experiment: ExperimentConfig
    out_dir: Path | None = None
    round_timeout: float | None = None
    node_wait_timeout: float = 120.0
    collect_states: bool = True

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FlowerRunSettings:
        """Parse Flower's (flat) run config; a bad experiment key or value is a :class:`ConfigError`."""
        experiment = experiment_from_run_config(run_config)
        out = str(run_config.get("out-dir", "") or "")
        timeout = float(run_config.get("round-timeout", 0.0) or 0.0)
        return cls(
            experiment=experiment,
            out_dir=Path(out) if out else None,
            round_timeout=timeout if timeout > 0 else None,
            node_wait_timeout=float(run_config.get("node-wait-timeout", 120.0)),
            collect_states=_run_bool(run_config, "collect-states", True),
        )

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """The flat run config (as Flower hands it to the apps) that :meth:`from_run_config` reads back."""
        return {
            **experiment_to_run_config(self.experiment),
            "out-dir": "" if self.out_dir is None else str(self.out_dir),
            "round-timeout": float(self.round_timeout or 0.0),
            "node-wait-timeout": float(self.node_wait_timeout),
            "collect-states": self.collect_states,
        }

    @classmethod
    def for_experiment(cls, experiment: ExperimentConfig, **kwargs: Any) -> FlowerRunSettings:
        """The settings of a run of ``experiment`` (``kwargs``: the Flower-side fields)."""
        return cls(experiment=experiment, **kwargs)
