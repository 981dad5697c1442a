"""The strategy interface: what each client receives, which experts it trains, how uploads aggregate.

A strategy never moves bytes. An engine (in-process simulation, or Flower) asks it for each
client's payload, runs the client, hands back the uploads, and calls :meth:`Strategy.aggregate`.
All tensors crossing that seam are CPU float32 ``torch.Tensor`` keyed as in
:class:`fedtreelora.adapters.AdapterBank` (``"{site}.{expert}.lora_A"`` ...).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar, overload

import numpy as np
import torch

from fedtreelora.adapters import PhaseSpec, Site
from fedtreelora.core.placement import Membership
from fedtreelora.strategies.options import StrategyOptions

Tensors = dict[str, torch.Tensor]

OptionsT = TypeVar("OptionsT", bound=StrategyOptions)
"""A strategy's options class: what :attr:`Strategy.options` holds (e.g. ``FedIT(Strategy[FedITOptions])``)."""


@dataclass(frozen=True)
class FederationContext:
    """What a strategy knows about the federation it serves.

    Attributes:
        num_clients: N.
        sites: every adapted projection, shallow to deep.
        num_layers: transformer blocks holding adapters.
        module_names: target module names in a fixed order (e.g. ``("query", "value")``).
        num_rounds: rounds in the run.
        num_examples: (clients,) training examples per client (for example-weighted averages).
        seed: the run seed.
        rank: LoRA rank.
        state_shapes: every state key's tensor shape.
        server_device: where aggregation runs: None for numpy float64 on the CPU; a torch device
            (``"cpu"``, ``"cuda"``) for torch float64 on it (a server with a GPU and many clients).
        membership: who takes part in which round (``federation.join`` / ``leave``, 0-based rounds);
            everyone in every round by default.
    """

    num_clients: int
    sites: tuple[Site, ...]
    num_layers: int
    module_names: tuple[str, ...]
    num_rounds: int
    num_examples: tuple[int, ...]
    seed: int = 0
    rank: int = 8
    state_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    server_device: str | None = None
    membership: Membership = field(default_factory=lambda: Membership(0))

    def present(self, rnd: int) -> list[int]:
        """The clients in the federation in round ``rnd`` (0-based), ascending."""
        return [k for k in range(self.num_clients) if self.membership.is_present(rnd, k)]


class Strategy(ABC, Generic[OptionsT]):
    """A federated LoRA method, generic over its options class ``OptionsT``.

    Subclasses set ``name``, ``paper`` and ``Options`` (a built-in method gets those and ``table_rank`` from
    its entry in :data:`fedtreelora.strategies.registry.METHODS`), and implement the abstract hooks. The
    engine calls, per round ``r``: :meth:`phase` (how adapters behave), :meth:`payload` for every
    client, then (after local training) :meth:`upload_keys` to pick what each client sends, and
    :meth:`aggregate` on all uploads.
    """

    name: ClassVar[str]
    paper: ClassVar[str] = ""
    #: where the method's row goes in tables and docs (see :func:`fedtreelora.strategies.registry.table_order`):
    #: the paper's order, reference points first (local 0, FedIT 10, ...), FedTreeLoRA last (1000); a new
    #: method's default puts it after the baselines.
    table_rank: ClassVar[int] = 500
    Options: ClassVar[type[StrategyOptions]] = StrategyOptions
    #: every expert the model must hold per target module, in slot order.
    expert_names: ClassVar[tuple[str, ...]]
    #: experts that start at zero instead of the shared random init (e.g. frozen external experts); a
    #: method whose experts depend on its options sets it per instance.
    zero_init_experts: tuple[str, ...] = ()
    #: experts whose random A factors are drawn after every other key's, so that adding them to a method
    #: leaves the other experts' initialisation (and everything that follows from it) unchanged.
    drawn_last_experts: ClassVar[tuple[str, ...]] = ()
    #: the expert every client shares in full (both factors) in a trunk layer (one where all clients are
    #: in one cluster), exportable as one adapter (``fedtreelora export --trunk``); None when the method
    #: has no such expert (e.g. FedSA-LoRA keeps B local).
    trunk_expert: ClassVar[str | None] = None

    def __init__(self, options: OptionsT, context: FederationContext) -> None:
        self.options: OptionsT = options
        self.context = context

    # --- what the model holds ---------------------------------------------------------------------
    @classmethod
    def experts_for(cls, options: OptionsT) -> tuple[str, ...]:
        """Experts the model must hold per target module under ``options`` (slot order).

        Defaults to :attr:`expert_names`; methods whose expert count depends on an option (e.g. a
        maximum number of clusters) override this.
        """
        return cls.expert_names

    @abstractmethod
    def phase(self, rnd: int) -> PhaseSpec:
        """How adapters behave in round ``rnd`` (0-based)."""

    def client_phase(self, rnd: int, client: int) -> PhaseSpec:
        """How ``client``'s adapters behave in round ``rnd``: :meth:`phase` unless the method treats some
        clients differently that round (FedTreeLoRA: a late client's own warm-up)."""
        return self.phase(rnd)

    @property
    def lambda_init(self) -> float:
        """Initial lambda of the ``lambda`` mixer."""
        return 0.5

    def initial_state(self, generator: torch.Generator) -> Tensors:
        """The state every client starts from (one shared initialisation, as a server would broadcast).

        A factors: Kaiming-uniform as in PEFT's default LoRA init; B factors zero; lambda logits at
        :attr:`lambda_init`; routers zero (uniform mixing). Experts in ``zero_init_experts`` are zero;
        those in ``drawn_last_experts`` are drawn after all others (keys keep their order otherwise).
        """
        state: Tensors = {}
        logit = math.log(self.lambda_init / (1.0 - self.lambda_init))

        def expert_of(key: str) -> str | None:
            return key.rsplit(".", 2)[-2] if key.endswith((".lora_A", ".lora_B")) else None

        items = sorted(self.context.state_shapes.items(), key=lambda kv: expert_of(kv[0]) in self.drawn_last_experts)
        for key, shape in items:
            expert = expert_of(key)
            if key.endswith(".lora_A") and expert not in self.zero_init_experts:
                # Same bound as torch.nn.init.kaiming_uniform_(a=sqrt(5)): 1 / sqrt(fan_in).
                bound = 1.0 / math.sqrt(shape[-1])
                state[key] = (torch.rand(shape, generator=generator) * 2.0 - 1.0) * bound
            elif key.endswith(".mix_logit"):
                state[key] = torch.full(shape, logit)
            elif key.startswith(tuple(s.name + "." for s in self.context.sites)):
                state[key] = torch.zeros(shape)
        return state

    # --- one round --------------------------------------------------------------------------------
    @abstractmethod
    def payload(self, rnd: int, client: int) -> Tensors:
        """Tensors the server sends client ``client`` before it trains in round ``rnd``."""

    @abstractmethod
    def upload_keys(self, rnd: int, client: int) -> Sequence[str]:
        """State keys client ``client`` sends back after training in round ``rnd``."""

    @abstractmethod
    def aggregate(self, rnd: int, uploads: Mapping[int, Tensors]) -> dict[str, Any]:
        """Fold round ``rnd``'s uploads (client -> tensors) into the next payloads.

        Returns a small JSON-ready dict of what happened (logged by the engine).
        """

    # --- server state: what a checkpoint (or a Flower ServerApp) must keep between rounds -----------
    @abstractmethod
    def state_dict(self) -> tuple[Tensors, dict[str, Any]]:
        """The server's state after the last :meth:`aggregate`: tensors under flat string keys, and
        JSON-ready metadata. Loading it into a fresh instance must give identical later payloads."""

    @abstractmethod
    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""

    def summary(self) -> dict[str, Any]:
        """What the run summary should record about this strategy beyond the sharing labels."""
        return {}

    def sharing_labels(self) -> np.ndarray | None:
        """(layers, clients): which clients' uploads are averaged together at each layer, as cluster
        ids; None when that is not (yet) defined."""
        return None

    # --- helpers for subclasses --------------------------------------------------------------------
    def weights(self, clients: Sequence[int], weighting: str) -> np.ndarray | None:
        """Averaging weights for ``clients``: None (uniform) or their example counts."""
        if weighting == "uniform":
            return None
        return np.asarray([self.context.num_examples[c] for c in clients], dtype=np.float64)

    def site_of(self, key: str) -> Site:
        """The site a state key belongs to."""
        for site in self.context.sites:
            if key.startswith(site.name + "."):
                return site
        raise KeyError(f"state key {key!r} belongs to no adapted site")

    def expert_keys(self, expert: str) -> list[str]:
        """All keys of one expert, site by site."""
        return [f"{s.name}.{expert}.{f}" for s in self.context.sites for f in ("lora_A", "lora_B")]

    def stack(self, uploads: Mapping[int, Tensors], clients: Sequence[int], key: str) -> np.ndarray | torch.Tensor:
        """(clients, ...) float64 values of one key across uploads, where this server aggregates
        (:attr:`FederationContext.server_device`)."""
        return stack(uploads, clients, key, self.context.server_device)


@overload
def stack(uploads: Mapping[int, Tensors], clients: Sequence[int], key: str, device: None = None) -> np.ndarray: ...


@overload
def stack(uploads: Mapping[int, Tensors], clients: Sequence[int], key: str, device: str) -> torch.Tensor: ...


def stack(
    uploads: Mapping[int, Tensors], clients: Sequence[int], key: str, device: str | None = None
) -> np.ndarray | torch.Tensor:
    """(clients, ...) float64 values of one key across uploads: a numpy array when ``device`` is None,
    else a torch tensor on ``device`` (the :mod:`fedtreelora.core` functions compute where it lives)."""
    if device is None:
        return np.stack([uploads[c][key].numpy().astype(np.float64) for c in clients])
    # Stack in float32 on the CPU, move once, widen there: half the bytes cross to the device.
    return torch.stack([uploads[c][key] for c in clients]).to(device).double()


def as_payload(value: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A server-side result (numpy array, or torch tensor on any device) as what crosses the wire: a
    CPU float32 tensor."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device="cpu", dtype=torch.float32)
    return torch.from_numpy(np.ascontiguousarray(value)).float()


def as_payloads(values: np.ndarray | torch.Tensor) -> list[torch.Tensor]:
    """(rows, ...) server-side results as one CPU float32 tensor per row, each with its own storage
    (a checkpoint saves them separately). One device-to-host copy for all rows, not one per row."""
    return [row.clone() for row in as_payload(values)]


def rename(tensors: Mapping[str, torch.Tensor], old: str, new: str) -> Tensors:
    """Move every ``.{old}.`` expert key to ``.{new}.``."""
    return {k.replace(f".{old}.", f".{new}."): v for k, v in tensors.items()}
