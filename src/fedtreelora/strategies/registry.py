"""Methods by name: a torch-free description of each (what the configuration, the CLI's listing and the
tables read), and the strategy classes, imported only when a run needs one.

Built-in methods are declared in :data:`METHODS` below; their strategy modules (torch) load on the first
:func:`get_strategy` or :func:`load_strategies`. A method defined elsewhere registers its class with
:func:`register`, which describes it in :data:`METHODS` from the class itself.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from fedtreelora.strategies.options import (
    FedALTOptions,
    FedDPAOptions,
    FedITOptions,
    FedLEASEOptions,
    FedSAOptions,
    FedTreeLoRAOptions,
    FFAOptions,
    StrategyOptions,
)

if TYPE_CHECKING:
    from fedtreelora.strategies.base import Strategy

# Strategy[Any]: the registry holds every method, each over its own options class; which one a run
# gets is known only at run time (the configuration checks its section against ``cls.Options``).
StrategyClass = TypeVar("StrategyClass", bound="type[Strategy[Any]]")

DEFAULT_TABLE_RANK = 500
"""Table rank of a method that gives none: after the baselines, before FedTreeLoRA (see :func:`table_order`)."""


@dataclass(frozen=True)
class MethodInfo:
    """What is known about a method without importing its strategy (and torch).

    Attributes:
        name: ``--method NAME``; also the name of its options' config section.
        paper: the paper it implements (``fedtreelora methods``, docs/methods.md).
        options: its options class (a section of the configuration schema).
        module: the module whose import registers its :class:`~fedtreelora.strategies.base.Strategy`.
        table_rank: where its row goes in tables and docs: the paper's order, reference points first
            (local 0, FedIT 10, ...), FedTreeLoRA last (1000).
    """

    name: str
    paper: str
    options: type[StrategyOptions]
    module: str
    table_rank: int = DEFAULT_TABLE_RANK


def _builtin(name: str, options: type[StrategyOptions], *, table_rank: int, paper: str) -> MethodInfo:
    """A method of this package: its strategy lives in ``fedtreelora.strategies.<name>``."""
    return MethodInfo(name, paper, options, f"fedtreelora.strategies.{name}", table_rank)


_BUILTIN_METHODS = (
    _builtin("local", StrategyOptions, table_rank=0, paper="reference point (no federation)"),
    _builtin(
        "fedit",
        FedITOptions,
        table_rank=10,
        paper="Zhang et al., Towards Building the Federated GPT: Federated Instruction Tuning, ICASSP 2024",
    ),
    _builtin(
        "ffa",
        FFAOptions,
        table_rank=20,
        paper="Sun, Li, Li, Ding, Improving LoRA in Privacy-preserving Federated Learning, ICLR 2024",
    ),
    _builtin(
        "fedsa",
        FedSAOptions,
        table_rank=30,
        paper="Guo et al., Selective Aggregation for Low-Rank Adaptation in Federated Learning, ICLR 2025",
    ),
    _builtin(
        "feddpa",
        FedDPAOptions,
        table_rank=40,
        paper="Yang, Long, Shen, Jiang, Blumenstein, Dual-Personalizing Adapter for Federated Foundation Models, "
        "NeurIPS 2024",
    ),
    _builtin(
        "fedalt",
        FedALTOptions,
        table_rank=50,
        paper="Bian, Wang, Zhang, Xu, FedALT: Federated Fine-Tuning through Adaptive Local Training with "
        "Rest-of-the-World LoRA, 2025",
    ),
    _builtin(
        "fedlease",
        FedLEASEOptions,
        table_rank=60,
        paper="Wang, Bian, Zhang, Xu, Adaptive LoRA Experts Allocation and Selection for Federated Fine-Tuning, "
        "NeurIPS 2025",
    ),
    _builtin(
        "fedtreelora",
        FedTreeLoRAOptions,
        table_rank=1000,
        paper="Bian, Wang, Zhang, Xu, FedTreeLoRA, ICML 2026 (arXiv 2603.13282)",
    ),
)

METHODS: dict[str, MethodInfo] = {info.name: info for info in _BUILTIN_METHODS}
"""Every known method by name (torch-free); the configuration has one options section per entry."""

STRATEGIES: dict[str, type[Strategy[Any]]] = {}
"""The strategy classes registered so far. ``fedtreelora.strategies.STRATEGIES`` loads every built-in one first."""

_DESCRIBED_BY_REGISTRY = ("paper", "table_rank", "Options")


def register(cls: StrategyClass) -> StrategyClass:
    """Class decorator: make a strategy available by its ``name``.

    A built-in method's class takes its ``paper``, ``table_rank`` and ``Options`` from its :data:`METHODS`
    entry (one place, readable without torch); a class that sets one of them itself must agree with it.
    Any other class is described in :data:`METHODS` from its own attributes.
    """
    if cls.name in STRATEGIES:
        raise ValueError(f"strategy {cls.name!r} is registered twice")
    info = METHODS.get(cls.name)
    if info is None:
        METHODS[cls.name] = MethodInfo(cls.name, cls.paper, cls.Options, cls.__module__, cls.table_rank)
    else:
        declared = {"paper": info.paper, "table_rank": info.table_rank, "Options": info.options}
        for attr in _DESCRIBED_BY_REGISTRY:
            if attr in vars(cls) and vars(cls)[attr] != declared[attr]:
                raise ValueError(f"strategy {cls.name!r} sets {attr} unlike its METHODS entry; change the entry")
            setattr(cls, attr, declared[attr])
    STRATEGIES[cls.name] = cls
    return cls


def load_strategies() -> dict[str, type[Strategy[Any]]]:
    """Import every known method's strategy module (torch) and return :data:`STRATEGIES`, complete."""
    for name in list(METHODS):
        get_strategy(name)
    return STRATEGIES


def get_strategy(name: str) -> type[Strategy[Any]]:
    """The strategy class called ``name`` (its module is imported on first use); a ValueError lists the
    valid names otherwise."""
    if name not in STRATEGIES:
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
        importlib.import_module(METHODS[name].module)
    return STRATEGIES[name]


def table_order(names: list[str] | tuple[str, ...]) -> list[str]:
    """``names`` (duplicates dropped) in the order of the paper's tables: by each method's ``table_rank``
    (reference points and baselines first, FedTreeLoRA last), ties and names that are no known method
    (a suite's variants: rank 500, after the baselines) by name."""

    def key(name: str) -> tuple[int, str]:
        info = METHODS.get(name)
        return (info.table_rank if info is not None else DEFAULT_TABLE_RANK, name)

    return sorted(dict.fromkeys(names), key=key)
