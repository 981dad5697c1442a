"""Strategies by name."""

from __future__ import annotations

from fedtreelora.strategies.base import Strategy

STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make a strategy available by its ``name``."""
    if cls.name in STRATEGIES:
        raise ValueError(f"strategy {cls.name!r} is registered twice")
    STRATEGIES[cls.name] = cls
    return cls


def table_order(names: list[str] | tuple[str, ...]) -> list[str]:
    """``names`` (duplicates dropped) in the order of the paper's tables: by each strategy's ``table_rank``
    (reference points and baselines first, FedTreeLoRA last), ties and names that are no registered
    strategy (a suite's variants: rank 500, after the baselines) by name."""

    def key(name: str) -> tuple[int, str]:
        cls = STRATEGIES.get(name)
        return (cls.table_rank if cls is not None else Strategy.table_rank, name)

    return sorted(dict.fromkeys(names), key=key)


def get_strategy(name: str) -> type[Strategy]:
    """The strategy class called ``name``; a ValueError lists the valid names otherwise."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(STRATEGIES)}") from None
