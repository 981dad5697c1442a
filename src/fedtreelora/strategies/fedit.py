"""FedIT: FedAvg of LoRA A and B into one global adapter, optionally on some layers only."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from fedtreelora.adapters import ExpertSpec, PhaseSpec
from fedtreelora.core import group_means
from fedtreelora.errors import ConfigError
from fedtreelora.strategies.base import Strategy, StrategyOptions, Tensors, as_payload
from fedtreelora.strategies.registry import register

SHARED_LAYERS_FORMS = "all, none, first:K, last:K, or a list of layer indices such as [0, 1, 2]"
"""The accepted forms of ``fedit.shared_layers``, as error messages list them."""

_FIRST_LAST = re.compile(r"^(first|last):(\d+)$")


def parse_shared_layers(value: object) -> str | list[int]:
    """Check the syntax of a ``shared_layers`` value and return its canonical form.

    Args:
        value: ``"all"``, ``"none"``, ``"first:K"``, ``"last:K"`` (K >= 0), a list of distinct
            non-negative layer indices, or the same list as a comma-separated string (``"0,2"``, what
            ``--set fedit.shared_layers=0,2`` gives).
    Returns:
        the string forms as given (whitespace removed), a list sorted ascending.
    Raises:
        ValueError naming the accepted forms (pydantic reports it under the field's name).
    """
    if isinstance(value, str):
        text = value.strip().replace(" ", "")
        if text in ("all", "none") or _FIRST_LAST.match(text):
            return text
        if text and all(part.isdigit() for part in text.split(",")):
            return parse_shared_layers([int(part) for part in text.split(",")])
        raise ValueError(f"not a layer selection; use {SHARED_LAYERS_FORMS}")
    if isinstance(value, (list, tuple)):
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
            raise ValueError("layer indices must be non-negative integers")
        if len(set(value)) != len(value):
            raise ValueError("layer indices must be distinct")
        return sorted(value)
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError(
            f"a bare number ({value}) is ambiguous: write first:{value} for the first {value} layers, "
            f"or [{value}] for layer {value} alone"
        )
    if isinstance(value, dict):
        raise ValueError("a mapping is not a layer selection: write first:K or last:K with no space after the colon")
    raise ValueError(f"not a layer selection; use {SHARED_LAYERS_FORMS}")


def resolve_shared_layers(
    spec: str | Sequence[int], num_layers: int, field: str = "fedit.shared_layers"
) -> tuple[int, ...]:
    """The layers a ``shared_layers`` selection (in :func:`parse_shared_layers`'s canonical form) names
    in a model with ``num_layers`` adapted layers, ascending.

    Raises:
        ConfigError naming ``field`` and the valid range when K exceeds ``num_layers`` or an index
        is not a layer of the model.
    """
    valid = (
        f"valid for this model ({num_layers} adapted layers): all, none, first:K or last:K with K in "
        f"0..{num_layers}, or layer indices in 0..{num_layers - 1}"
    )
    if spec == "all":
        return tuple(range(num_layers))
    if spec == "none":
        return ()
    if isinstance(spec, str):
        match = _FIRST_LAST.match(spec)
        if match is None:
            raise ConfigError(f"{field}={spec!r} is not a layer selection; use {SHARED_LAYERS_FORMS}")
        k = int(match.group(2))
        if k > num_layers:
            raise ConfigError(f"{field}={spec!r} names more layers than the model has; {valid}")
        return tuple(range(k)) if match.group(1) == "first" else tuple(range(num_layers - k, num_layers))
    outside = [i for i in spec if not 0 <= i < num_layers]
    if outside:
        raise ConfigError(f"{field}={list(spec)!r}: layer(s) {outside} do not exist; {valid}")
    return tuple(sorted(spec))


class FedITOptions(StrategyOptions):
    weighting: Literal["uniform", "examples"] = "uniform"
    """How uploads are averaged: ``uniform`` (equal clients, as in the paper's setup) or by example count."""
    warmup_rounds: int = Field(0, ge=0)
    """Rounds of purely local training before the first average (0: FedAvg from round 1). With the same
    warm-up, FedTreeLoRA with one cluster at every layer (``window=1``) computes exactly this."""
    shared_layers: str | list[int] = "all"
    """Which transformer layers' LoRAs are averaged (FedAvg); the others stay local to each client (never
    sent, never overwritten). ``all``; ``none`` (local training); ``first:K``: layers 0..K-1, nearest the
    input; ``last:K``: the K deepest; or a list of layer indices (``[0, 2]``, or ``0,2`` on the command
    line). K is checked against the model's layers when the run starts (``first:0`` and ``last:0`` mean
    none)."""

    @field_validator("shared_layers", mode="before")
    @classmethod
    def _shared_layers(cls, value: object) -> str | list[int]:
        return parse_shared_layers(value)


class AllLayersOptions(FedITOptions):
    """Options of a FedIT-derived method that shares its federated part in every layer: ``shared_layers``
    is fixed at ``all`` (depth-limited FedAvg is FedIT's ``shared_layers``)."""

    shared_layers: Literal["all"] = "all"  # type: ignore[assignment]
    """Always ``all``: this method shares its federated part in every layer (depth-limited sharing is
    ``fedit.shared_layers``)."""

    @field_validator("shared_layers", mode="before")
    @classmethod
    def _shared_layers(cls, value: object) -> str:
        if value != "all":
            raise ValueError(
                "only 'all' is supported here; depth-limited FedAvg is --method fedit with fedit.shared_layers"
            )
        return "all"


@register
class FedIT(Strategy):
    """FedIT (Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning", ICASSP 2024).

    Shared: one LoRA (A and B averaged separately, FedAvg). Local: nothing persists that the server
    does not overwrite. Frozen: backbone and head.
    On the wire each round: up, the client's trained LoRA; down, the global LoRA (from round 1 on;
    in round 0 every client already holds the same initialisation).

    With ``warmup_rounds`` W > 0 the first W rounds train locally and share nothing (phase ``warmup``);
    the uploads of round W are the first to be averaged, so round W + 1 starts from FedAvg of the
    clients' warm-up LoRAs.

    Depth-limited FedAvg (``shared_layers``, default ``all``; the paper's motivating experiment): only
    the LoRAs of the selected transformer layers are shared as above. Local: the LoRAs (A and B) of the
    other layers, trained by each client, never sent and never overwritten, as in local training.
    Frozen: backbone and head, as always. On the wire: the shared layers' A and B only, both ways.
    ``first:K`` shares the K layers nearest the input, ``last:K`` the K deepest, ``none`` nothing (local
    training, exactly), ``all`` every layer (FedIT, exactly). :meth:`sharing_labels` puts every client
    in one cluster on a shared layer and each client alone on a local one; the summary records the
    shared layers (``shared_layers``).
    """

    name = "fedit"
    table_rank = 10
    expert_names = ("shared",)
    trunk_expert = "shared"
    paper = "Zhang et al., Towards Building the Federated GPT: Federated Instruction Tuning, ICASSP 2024"
    Options = FedITOptions

    def __init__(self, options: FedITOptions, context) -> None:  # type: ignore[no-untyped-def]
        super().__init__(options, context)
        # The layers whose uploads are averaged, ascending (a range error names this method's option).
        self.shared_layers = resolve_shared_layers(
            options.shared_layers, context.num_layers, f"{self.name}.shared_layers"
        )
        self._shared_sites = frozenset(s.name for s in context.sites if s.layer in self.shared_layers)
        self._global: Tensors = {}

    def is_warmup(self, rnd: int) -> bool:
        return rnd < self.options.warmup_rounds

    def phase(self, rnd: int) -> PhaseSpec:
        name = "warmup" if self.is_warmup(rnd) else "federated"
        return PhaseSpec(experts=(ExpertSpec(self.expert_names[0]),), mixer="single", name=name)

    def on_shared_layers(self, keys: Iterable[str]) -> list[str]:
        """The state keys among ``keys`` that belong to a shared layer's site, in their order."""
        return [k for k in keys if k.rsplit(".", 2)[0] in self._shared_sites]

    def sharing_labels(self) -> np.ndarray:
        labels = np.tile(np.arange(self.context.num_clients, dtype=np.int64), (self.context.num_layers, 1))
        labels[list(self.shared_layers)] = 0
        return labels

    def payload(self, rnd: int, client: int) -> Tensors:
        return dict(self._global)

    def upload_keys(self, rnd: int, client: int) -> Sequence[str]:
        return self.on_shared_layers(self.expert_keys("shared"))

    def aggregate(self, rnd: int, uploads: Mapping[int, Tensors]) -> dict[str, Any]:
        if rnd < self.options.warmup_rounds - 1:
            return {}  # warm-up goes on: nothing is shared
        clients = sorted(uploads)
        if not clients:
            return {"aggregated": 0}
        weights = self.weights(clients, self.options.weighting)
        labels = np.zeros(len(clients), dtype=np.int64)
        for key in uploads[clients[0]]:
            inside, _ = group_means(self.stack(uploads, clients, key), labels, weights)
            self._global[key] = as_payload(inside[0])
        return {"aggregated": len(clients)}

    def summary(self) -> dict[str, Any]:
        return {"shared_layers": list(self.shared_layers)}

    def state_dict(self) -> tuple[Tensors, dict[str, Any]]:
        return dict(self._global), {}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        self._global = {k: v.clone() for k, v in tensors.items()}
