"""How a round's phase travels to a Flower node: its name, which the node checks against the phase it
computes itself, and what only the server knows (the layers FedTreeLoRA's plan shares among everyone)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from fedtreelora.adapters import PhaseSpec


def phase_config(phase: PhaseSpec) -> dict[str, str]:
    """What a message tells a node about the phase it runs: its name (checked against the node's own),
    and what only the server knows (the layers every client shares, from FedTreeLoRA's plan)."""
    return {"phase": phase.name, "single-layers": ",".join(str(layer) for layer in sorted(phase.single_layers))}


def node_phase(strategy: Any, rnd: int, cfg: Mapping[str, Any], client: int) -> PhaseSpec:
    """Client ``client``'s phase of round ``rnd`` (0-based) as its node computes it (the round's phase,
    or a late client's own warm-up: ``Strategy.client_phase``), completed by what the server sent."""
    phase = strategy.client_phase(rnd, client)
    if phase.name != str(cfg["phase"]):
        raise ValueError(
            f"round {rnd + 1}: the server is in phase {cfg['phase']!r} but this node computes {phase.name!r}; "
            "server and nodes must run the same fedtreelora version and experiment config"
        )
    single = str(cfg.get("single-layers", "") or "")
    return dataclasses.replace(phase, single_layers=frozenset(int(v) for v in single.split(",") if v))
