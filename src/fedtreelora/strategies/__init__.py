"""Federated LoRA methods, one module each, registered by name.

Importing this package loads no torch: the method descriptions and options
(:data:`~fedtreelora.strategies.registry.METHODS`, :mod:`~fedtreelora.strategies.options`) are torch-free,
and the strategy classes load on first use (:func:`get_strategy`, or any name below that needs them).
"""

from __future__ import annotations

import importlib
from typing import Any

from fedtreelora.strategies.options import StrategyOptions
from fedtreelora.strategies.registry import METHODS, MethodInfo, get_strategy, load_strategies, register, table_order

# Names whose import needs torch: resolved on first access (PEP 562), so `import fedtreelora.strategies`
# stays cheap for the configuration and the CLI's listings.
_FROM_BASE = ("FederationContext", "Strategy", "Tensors")

__all__ = [
    "METHODS",
    "STRATEGIES",
    "FederationContext",
    "MethodInfo",
    "Strategy",
    "StrategyOptions",
    "Tensors",
    "get_strategy",
    "load_strategies",
    "register",
    "table_order",
]


def __getattr__(name: str) -> Any:
    if name == "STRATEGIES":  # every built-in strategy class, imported now
        return load_strategies()
    if name in _FROM_BASE:
        return getattr(importlib.import_module("fedtreelora.strategies.base"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
