"""Small pieces several strategies share: per-client server state on flat keys, and B matrices by
module for the distance computations of :mod:`fedtreelora.core`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, TypeVar

import numpy as np
import torch

from fedtreelora.errors import ConfigError
from fedtreelora.strategies.base import FederationContext, Strategy, Tensors, stack
from fedtreelora.strategies.options import FedLEASEOptions, FedTreeLoRAOptions

ClusteredOptionsT = TypeVar("ClusteredOptionsT", bound=FedLEASEOptions | FedTreeLoRAOptions)
"""The options of a :class:`ClusteredAfterWarmup` strategy (both have ``warmup_rounds`` and ``distance``)."""


def flatten_by_owner(per_owner: Mapping[int, Mapping[str, torch.Tensor]]) -> Tensors:
    """``{owner: {key: t}}`` (owner = a client or a cluster id) as one flat ``{"owner/key": t}`` dict,
    the form :meth:`Strategy.state_dict` returns."""
    return {f"{owner}/{key}": t for owner, tensors in per_owner.items() for key, t in tensors.items()}


def unflatten_by_owner(tensors: Mapping[str, torch.Tensor]) -> dict[int, Tensors]:
    """Inverse of :func:`flatten_by_owner` (tensors are cloned)."""
    out: dict[int, Tensors] = {}
    for flat, t in tensors.items():
        owner, key = flat.split("/", 1)
        out.setdefault(int(owner), {})[key] = t.clone()
    return out


def b_matrices_by_module(
    uploads: Mapping[int, Tensors], clients: list[int], context: FederationContext, expert: str
) -> list[np.ndarray] | list[torch.Tensor]:
    """Every client's uploaded B factors of ``expert``, one array per target module, as
    :func:`fedtreelora.core.layer_distances` takes them.

    Returns:
        per module in ``context.module_names`` order, a (clients, layers, d_out, rank) float64 array
        (a torch tensor on ``context.server_device`` when that is set).
    Raises:
        ValueError when a target module is not adapted in every layer.
    """
    device = context.server_device
    on_host: list[np.ndarray] = []  # device None: numpy
    on_device: list[torch.Tensor] = []  # else torch, on the device
    for module in context.module_names:
        sites = sorted((s for s in context.sites if s.module == module), key=lambda s: s.layer)
        if [s.layer for s in sites] != list(range(context.num_layers)):
            raise ConfigError(
                f"target module {module!r} is not adapted in every layer; layer-wise distances need one per layer"
            )
        keys = [f"{s.name}.{expert}.lora_B" for s in sites]
        if device is None:
            on_host.append(np.stack([stack(uploads, clients, k) for k in keys], axis=1))
        else:
            on_device.append(torch.stack([stack(uploads, clients, k, device) for k in keys], dim=1))
    return on_host if device is None else on_device


def remember_b(store: dict[int, Tensors], uploads: Mapping[int, Tensors]) -> None:
    """Keep each uploading client's latest B factors (clusters are built, and late clients placed, from these)."""
    for c, upload in uploads.items():
        store[c] = {k: v for k, v in upload.items() if k.endswith(".lora_B")}


def distances_to_members(
    store: Mapping[int, Tensors],
    members: list[int],
    newcomer: Tensors,
    context: FederationContext,
    expert: str,
    metric: str,
) -> np.ndarray:
    """(layers, members) distances between a newcomer's uploaded B (``newcomer``) and each member's stored B."""
    from fedtreelora.core import layer_distances

    ref = {c: store[c] for c in members}
    ref[-1] = {k: v for k, v in newcomer.items() if k.endswith(".lora_B")}
    per_module = b_matrices_by_module(ref, [*members, -1], context, expert)
    return layer_distances(per_module, metric=metric)[:, -1, :-1]


def update_alignment(
    update: Tensors, experts: Mapping[int, Tensors], members: list[int], context: FederationContext, expert: str
) -> np.ndarray:
    """(layers, members) one minus the cosine between a client's B update and the ``expert`` B each member
    holds, at each layer the mean over target modules: small where the client keeps learning along what
    the member's cluster shares.

    Args:
        update: key -> the client's B update (``"{site}.{expert}.lora_B"`` (d_out, rank)).
        experts: member -> its state or payload holding the same keys (its cluster's expert).
        members: the members, in the order of the columns.
    """
    out = np.zeros((context.num_layers, len(members)))
    modules = np.zeros(context.num_layers)
    for site in context.sites:
        key = f"{site.name}.{expert}.lora_B"
        u = update[key].double().flatten()
        for j, m in enumerate(members):
            e = experts[m][key].double().flatten()
            norms = float(u.norm() * e.norm())
            out[site.layer, j] += 1.0 - (float(u @ e) / norms if norms > 0 else 0.0)
        modules[site.layer] += 1
    return out / np.maximum(modules, 1)[:, None]


def nearest_group(groups: np.ndarray, distances: np.ndarray) -> int:
    """The group with the smallest average distance (the average-linkage criterion).

    Args:
        groups: (members,) group of each member.
        distances: (members,) distance of the newcomer to each member.
    """
    return int(min(np.unique(groups), key=lambda g: float(distances[groups == g].mean())))


class ClusteredAfterWarmup(Strategy[ClusteredOptionsT]):
    """A strategy that clusters clients from the B matrices they upload during warm-up (FedTreeLoRA,
    FedLEASE): it keeps each client's latest warm-up B, and places a client that missed warm-up by
    its distances to those.

    Subclasses set :attr:`trained_expert` and give their options ``warmup_rounds`` and ``distance``.
    """

    #: the expert whose B factors the clustering compares
    trained_expert: ClassVar[str]

    def __init__(self, options: ClusteredOptionsT, context: FederationContext) -> None:
        super().__init__(options, context)
        self._warmup_b: dict[int, Tensors] = {}  # latest warm-up B per client (and per placed newcomer)

    def is_warmup(self, rnd: int) -> bool:
        return rnd < self.options.warmup_rounds

    def remember_warmup(self, rnd: int, uploads: Mapping[int, Tensors]) -> bool:
        """Keep warm-up uploads' B; True while warm-up continues after round ``rnd`` (nothing to aggregate).

        The latest B of every client counts, so a client that missed the last warm-up round (not
        sampled, or its update rejected) still joins the clustering.
        """
        if not self.is_warmup(rnd):
            return False
        remember_b(self._warmup_b, uploads)
        return rnd < self.options.warmup_rounds - 1

    def warmup_members(self) -> list[int]:
        """Clients with a warm-up B, sorted.

        Raises:
            ValueError: nobody's update was accepted during warm-up.
        """
        members = sorted(self._warmup_b)
        if not members:
            raise ValueError(f"no client update was accepted during warm-up; {self.name} cannot cluster the clients")
        return members

    def newcomer_distances(self, client: int, upload: Tensors, members: list[int]) -> np.ndarray:
        """(layers, members) distances of a newcomer's uploaded B to the members' warm-up B; the
        newcomer's B is kept from now on."""
        d = distances_to_members(
            self._warmup_b,
            members,
            upload,
            self.context,
            self.trained_expert,
            self.options.distance,
        )
        remember_b(self._warmup_b, {client: upload})
        return d
