"""The keys a fedtreelora Flower app reads from Flower's run config and node config.

Run config (``[tool.flwr.app.config]`` of the app's ``pyproject.toml``, or ``flwr run --run-config``):

* ``experiment``: the experiment config as JSON (what ``fedtreelora config`` writes as YAML).
* ``out-dir``: the run folder the ServerApp writes (metrics, summary...; see :mod:`fedtreelora.runfolder`; "" for none).
* ``round-timeout``: seconds the server waits for a round's replies; clients that have not answered
  by then miss the round (stragglers) and keep their previous state. 0 waits for every reply.
* ``node-wait-timeout``: seconds the server waits at start for every client's node to connect.
* ``collect-states``: whether the nodes send their final personal adapters at the end of the run (so
  ``fedtreelora export`` works on the server's folder); false keeps them on the nodes only.

Node config (``flower-supernode --node-config``):

* simulation: ``partition-id`` (set by Flower) is the client id in the configured partition;
* deployment: ``client-id`` (0..N-1, stable across runs) and ``data``, the site's own dataset
  (a file or folder readable by ``data.dataset``; its ``validation`` split or a held-out share).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtreelora.config import ConfigError, ExperimentConfig, validate_config

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


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


@dataclass(frozen=True)
class FlowerRunSettings:
    """A run as the ServerApp and ClientApp see it."""

    experiment: ExperimentConfig
    experiment_json: str
    out_dir: Path | None = None
    round_timeout: float | None = None
    node_wait_timeout: float = 120.0
    collect_states: bool = True

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FlowerRunSettings:
        """Parse Flower's run config; a missing or malformed ``experiment`` is a clear error."""
        raw = run_config.get("experiment")
        if not isinstance(raw, str) or not raw.strip():
            raise ConfigError(
                "the Flower run config has no 'experiment' (the experiment config as JSON); write the app with "
                "`fedtreelora flower app --config FILE --out APP_DIR`"
            )
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"the Flower run config's 'experiment' is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError("the Flower run config's 'experiment' must be a JSON object (the experiment config)")
        # The same validation as `fedtreelora run`, so a bad key reads the same on both engines.
        experiment = validate_config(data)
        out = str(run_config.get("out-dir", "") or "")
        timeout = float(run_config.get("round-timeout", 0.0) or 0.0)
        return cls(
            experiment=experiment,
            experiment_json=raw,
            out_dir=Path(out) if out else None,
            round_timeout=timeout if timeout > 0 else None,
            node_wait_timeout=float(run_config.get("node-wait-timeout", 120.0)),
            collect_states=_run_bool(run_config, "collect-states", True),
        )

    def to_run_config(self) -> dict[str, Any]:
        """The run-config table (TOML-ready) that :meth:`from_run_config` reads back."""
        return {
            "experiment": self.experiment_json,
            "out-dir": "" if self.out_dir is None else str(self.out_dir),
            "round-timeout": float(self.round_timeout or 0.0),
            "node-wait-timeout": float(self.node_wait_timeout),
            "collect-states": self.collect_states,
        }

    @classmethod
    def for_experiment(cls, experiment: ExperimentConfig, **kwargs: Any) -> FlowerRunSettings:
        return cls(experiment=experiment, experiment_json=json.dumps(experiment.model_dump(mode="json")), **kwargs)
