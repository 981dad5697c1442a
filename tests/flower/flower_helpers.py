"""Shared pieces of the Flower tests: a small experiment and a run of it in the in-process engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedtreelora.config import ExperimentConfig, experiment_config_model  # noqa: E402
from fedtreelora.engines import SimulationEngine  # noqa: E402


def small_experiment(method: str, *, rounds: int = 3, num_clients: int = 3, **sections: Any) -> ExperimentConfig:
    """MiniLM cut to 2 layers, a few clients with 16 examples each."""
    data: dict[str, Any] = {
        "method": method,
        "model": {"num_layers": 2, "max_length": 32},
        "data": {"num_clients": num_clients, "n_train": 16, "n_val": 16},
        "federation": {"rounds": rounds},
        "train": {"local_epochs": 1, "batch_size": 8},
        "logging": {"tensorboard": False},
    }
    if method == "fedtreelora":
        data["fedtreelora"] = {"warmup_rounds": 1}
    data.update(sections)
    return experiment_config_model().model_validate(data)


def metrics_by_client_round(run_dir: Path) -> dict[tuple[int, int], dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {(r["round"], r["client"]): r for r in map(json.loads, lines) if r}


def in_process(config: ExperimentConfig, out: Path) -> dict[str, Any]:
    return SimulationEngine(config, out, quiet=True, report=False).run()
