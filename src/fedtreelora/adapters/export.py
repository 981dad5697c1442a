"""The math of exporting a client's mix of experts as one standard LoRA (tensors in, tensors out).

A FedTreeLoRA client computes, at every adapted projection (method.md step 6),
``W0 x + lambda * s * B_c A_c x + (1 - lambda) * s * B_e A_e x`` with ``s = alpha / r``. That is exactly
one LoRA of rank 2r::

    A = [A_c; A_e]                          (2r x d_in)
    B = [lambda B_c, (1 - lambda) B_e]      (d_out x 2r)
    s * B A = lambda s B_c A_c + (1 - lambda) s B_e A_e

PEFT scales a rank-R LoRA by ``lora_alpha / R``; the export writes ``lora_alpha = E * alpha`` for
``R = E * r`` (E experts) so the scaling stays ``alpha / r``. The same holds for any fixed mix of E
experts (``fixed`` mixer: ``B = [w_1 B_1, ..., w_E B_E]``; FedTreeLoRA's ``external: per_cluster``
gives every other cluster ``1 - lambda``; FedDPA with ``inference: fixed``). Methods with one active
expert (FedIT, local training, a run that ended in warm-up) export rank r. A ``router`` mixer
(FedALT, FedLEASE, FedTreeLoRA's ``mixer: router``) or an ``instance`` mixer (FedDPA's instance-wise
inference) weighs the experts per token or per example, which no single LoRA can reproduce; exporting
such a run raises :class:`ExportError` naming the mixer.

Reading a run folder and writing the PEFT adapter folders is :mod:`fedtreelora.export`'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedtreelora.adapters.inject import layer_index
from fedtreelora.errors import ConfigError

#: Mixers whose expert weights are constants per site, so that the mix is one LoRA.
EXPORTABLE_MIXERS = ("single", "lambda", "fixed")


class ExportError(ConfigError):
    """The run cannot be exported as requested (e.g. a router mixer, a missing client)."""


def expert_weights(
    phase: Mapping[str, Any], state: Mapping[str, torch.Tensor], site: str, method: str = "this"
) -> list[float]:
    """The constant weight of every expert at one site.

    Args:
        phase: the client's phase (see :func:`fedtreelora.export.client_phase`): ``mixer``, ``experts``, ``fixed_weights``.
        state: the client's adapter state.
        site: module name of the site.
        method: the run's method, for the error message.
    Returns:
        one weight per mixed expert, in the order of ``phase["experts"]``: ``[1]`` (expert 0 alone) for
        ``single``, ``[1, 0, ...]`` in the phase's ``single_layers`` (FedTreeLoRA's layers shared by
        everyone), ``[lambda, 1 - lambda, ...]`` for ``lambda``, the fixed weights for ``fixed``; residual
        experts (``phase["residual"]``, last) get 1.
    Raises:
        ExportError for a mixer whose weights depend on the input (``router``, ``instance``).
    """
    residual = list(phase.get("residual") or ())
    mixed = [e for e in phase["experts"] if e not in residual]
    weights = _mixed_weights(phase, mixed, state, site, method)
    if residual:  # residual experts come last and act at weight 1 whatever the mixer
        weights = weights + [0.0] * (len(mixed) - len(weights)) + [1.0] * len(residual)
    return weights


def _mixed_weights(
    phase: Mapping[str, Any], experts: list[str], state: Mapping[str, torch.Tensor], site: str, method: str
) -> list[float]:
    """Weights of the mixed (non-residual) experts; ``[1.0]`` alone for expert 0 under ``single``."""
    mixer = phase["mixer"]
    if mixer == "single":
        return [1.0]
    if layer_index(site) in set(phase.get("single_layers") or ()):  # a layer every client shares: expert 0 alone
        return [1.0] + [0.0] * (len(experts) - 1)
    if mixer == "lambda":
        lam = float(torch.sigmoid(state[f"{site}.mix_logit"].float()))
        return [lam] + [1.0 - lam] * (len(experts) - 1)
    if mixer == "fixed":
        weights = phase.get("fixed_weights")
        if weights is None or len(weights) != len(experts):
            raise ExportError("the run's fixed mixer recorded no weight per expert")
        return [float(w) for w in weights]
    how = "a learned per-token softmax router" if mixer == "router" else "weights computed for each example"
    raise ExportError(
        f"the {method} run mixes its experts with the {mixer!r} mixer ({how}); that is not one LoRA, so it "
        f"cannot be exported as a PEFT LoRA adapter. Exportable mixers: {', '.join(EXPORTABLE_MIXERS)}"
    )


def merged_factors(
    phase: Mapping[str, Any], state: Mapping[str, torch.Tensor], site: str, method: str = "this"
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LoRA equal to the weighted mix of a site's experts.

    Returns:
        (A, B) with A (E * r, d_in) the experts' A stacked, B (d_out, E * r) the experts' B, each
        multiplied by its weight, side by side; so ``B @ A = sum_e w_e B_e A_e``.
    """
    weights = expert_weights(phase, state, site, method)
    used = list(phase["experts"])[: len(weights)]
    a = torch.cat([state[f"{site}.{e}.lora_A"].float() for e in used], dim=0)
    b = torch.cat([w * state[f"{site}.{e}.lora_B"].float() for e, w in zip(used, weights, strict=True)], dim=1)
    return a, b


def averaged_factors(
    states: Sequence[Mapping[str, torch.Tensor]], weights: np.ndarray, sites: Sequence[str], expert: str
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The weighted average of one expert over clients, A and B averaged separately (as a server does).

    Args:
        states: the clients' adapter states.
        weights: (clients,) non-negative weights, normalised here to sum to 1.
        sites: module names of the sites to average.
        expert: the expert's name.
    Returns:
        site -> (A (r, d_in), B (d_out, r)).
    """
    w = torch.as_tensor(weights / weights.sum(), dtype=torch.float32)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in sites:
        a = torch.einsum("k,kij->ij", w, torch.stack([s[f"{name}.{expert}.lora_A"].float() for s in states]))
        b = torch.einsum("k,kij->ij", w, torch.stack([s[f"{name}.{expert}.lora_B"].float() for s in states]))
        factors[name] = (a, b)
    return factors
