"""Module dependencies run one way: core -> adapters -> train -> strategies -> engines -> cli, compare,
report, export. Each check imports a layer's every module in a fresh interpreter and looks at what
``sys.modules`` holds afterwards, so an import hidden in a lower layer (even a lazy one taken at import
time) shows up; and reading a configuration or listing the methods must not load torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

TOP = ("cli", "compare", "report", "export", "suites", "docgen")
"""The user-facing modules, above the engines."""

LAYERS = ("core", "adapters", "train", "strategies", "engines")
"""The layers, lowest first; ``config``, ``errors``, ``data``, ``models`` and ``runfolder`` are support
modules that any layer from ``train`` up may use."""


def _loaded_after(code: str) -> list[str]:
    """Every module name in ``sys.modules`` after a fresh interpreter runs ``code``."""
    script = textwrap.dedent(code) + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300, env=env
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _import_every_module(package: str) -> str:
    """Code that imports ``package`` and every module under it."""
    return f"""
    import importlib, pkgutil
    package = importlib.import_module({package!r})
    for module in pkgutil.walk_packages(getattr(package, "__path__", []), package.__name__ + "."):
        importlib.import_module(module.name)
    """


def _from(modules: list[str], parts: tuple[str, ...]) -> list[str]:
    """The loaded modules that belong to ``fedtreelora.<part>`` for one of ``parts``."""
    prefixes = tuple(f"fedtreelora.{p}" for p in parts)
    return [m for m in modules if m in prefixes or m.startswith(tuple(p + "." for p in prefixes))]


@pytest.mark.parametrize("layer", LAYERS)
def test_a_layer_imports_nothing_from_a_higher_one(layer: str) -> None:
    higher = LAYERS[LAYERS.index(layer) + 1 :] + TOP
    loaded = _loaded_after(_import_every_module(f"fedtreelora.{layer}"))
    assert f"fedtreelora.{layer}" in loaded
    assert _from(loaded, higher) == [], f"fedtreelora.{layer} imports a higher layer"


def test_core_is_numpy_only() -> None:
    """The algorithm on arrays loads torch only when handed torch tensors (a server on a GPU)."""
    assert "torch" not in _loaded_after(_import_every_module("fedtreelora.core"))


def test_method_table_and_options_load_no_torch() -> None:
    loaded = _loaded_after(
        """
        from fedtreelora.strategies import METHODS, table_order
        from fedtreelora.strategies.options import FedTreeLoRAOptions
        assert table_order(list(METHODS))[-1] == "fedtreelora"
        FedTreeLoRAOptions(tau="auto")
        """
    )
    assert "torch" not in loaded
    assert _from(loaded, ("adapters", "train", "engines")) == []


def test_reading_a_configuration_loads_no_torch() -> None:
    loaded = _loaded_after(
        """
        from fedtreelora.config import config_reference, dump_config, load_config
        config = load_config(overrides=["method=feddpa", "feddpa.local_weight=0.3"])
        assert config.method_options().local_weight == 0.3
        dump_config(config)
        config_reference()
        """
    )
    assert "torch" not in loaded
    assert _from(loaded, ("adapters", "train", "engines", *TOP)) == []


def test_listing_the_methods_loads_no_torch() -> None:
    loaded = _loaded_after(
        """
        import contextlib, io
        from fedtreelora.cli import main
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["methods"]) == 0
        assert "fedtreelora" in out.getvalue() and "ICML" in out.getvalue()
        """
    )
    assert "torch" not in loaded
