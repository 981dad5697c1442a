"""Federated LoRA methods, one module each, registered by name."""

from fedtreelora.strategies import (  # noqa: F401  (registration)
    fedalt,
    feddpa,
    fedit,
    fedlease,
    fedsa,
    fedtreelora,
    ffa,
    local,
)
from fedtreelora.strategies.base import FederationContext, Strategy, StrategyOptions, Tensors
from fedtreelora.strategies.registry import STRATEGIES, get_strategy, register, table_order

__all__ = [
    "STRATEGIES",
    "FederationContext",
    "Strategy",
    "StrategyOptions",
    "Tensors",
    "get_strategy",
    "register",
    "table_order",
]
