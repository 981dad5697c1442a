"""A Flower app folder for one experiment: the ``pyproject.toml`` that ``flwr run`` builds into a FAB.

The app's code is fedtreelora itself, installed on the SuperLink and on every SuperNode; the folder
only names the ServerApp and ClientApp and carries the run config: one key per experiment setting
(``method``, ``rounds``, ``train.lr``...; see :mod:`fedtreelora.engines.flower.settings`), so that
``flwr run APP --run-config "train.lr=1e-3"`` overrides one of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

from fedtreelora.engines.flower.settings import FlowerRunSettings

SERVER_APP = "fedtreelora.engines.flower.server_app:app"
CLIENT_APP = "fedtreelora.engines.flower.client_app:app"


def nested_run_config(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Flat run-config keys as TOML tables (``train.lr`` -> ``[...config.train] lr``); Flower flattens
    them back to the same keys."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *sections, name = key.split(".")
        table = nested
        for section in sections:
            table = table.setdefault(section, {})
        table[name] = value
    return nested


def app_pyproject(settings: FlowerRunSettings, *, name: str = "fedtreelora-run") -> dict[str, Any]:
    """The app's ``pyproject.toml`` as a dict."""
    return {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": name,
            "version": "1.0.0",
            "description": f"fedtreelora {settings.experiment.method} on {settings.experiment.data.dataset}",
            # fedtreelora (and Flower) are installed on every machine; nothing to install at run time.
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fedtreelora",
                    "components": {"serverapp": SERVER_APP, "clientapp": CLIENT_APP},
                    "config": nested_run_config(settings.to_run_config()),
                }
            }
        },
    }


def write_app(settings: FlowerRunSettings, app_dir: str | Path) -> Path:
    """Write the app folder (``pyproject.toml`` and a README line); returns its path."""
    folder = Path(app_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(tomli_w.dumps(app_pyproject(settings)))
    (folder / "README.md").write_text(
        "A Flower app running fedtreelora; its code is the installed `fedtreelora` package.\n"
        "Run it with `flwr run . <superlink-connection>`.\n"
    )
    return folder
