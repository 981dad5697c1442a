"""A run's privacy settings resolved from its config: the noise multiplier (given, or derived from a
target epsilon), the sampling rate the accountant uses, and epsilon after a number of rounds."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fedtreelora.config import ExperimentConfig
from fedtreelora.privacy.accountant import epsilon, noise_multiplier_for
from fedtreelora.privacy.mechanism import GaussianUpdate

__all__ = ["PrivacySettings", "privacy_settings", "sampling_rate"]


def sampling_rate(config: ExperimentConfig) -> float:
    """The share of clients that train (and upload) in a round: the engines sample
    ``max(1, round(fraction_train * num_clients))`` of them, so this is that count over ``num_clients``
    (``federation.fraction_train`` itself whenever the product is a whole number)."""
    n = config.data.num_clients
    fraction = config.federation.fraction_train
    return 1.0 if fraction >= 1.0 else max(1, round(fraction * n)) / n


@dataclass(frozen=True)
class PrivacySettings:
    """The privacy of one run, resolved.

    Attributes:
        clip_norm: S, the L2 bound of a client's update.
        noise_multiplier: z, the noise std over S (derived from ``target_epsilon`` when that is set).
        delta: the delta at which epsilon is reported.
        accountant: ``rdp`` or ``prv``.
        adjacency: ``add_remove`` (sensitivity S) or ``replace`` (sensitivity 2S).
        sample_rate: q, the share of clients sampled per round.
        target_epsilon: the target z was derived from, or None.
        planned_rounds: the rounds the target was spread over (``federation.rounds``).
    """

    clip_norm: float
    noise_multiplier: float
    delta: float
    accountant: str
    adjacency: str
    sample_rate: float
    target_epsilon: float | None
    planned_rounds: int

    @property
    def accounted_multiplier(self) -> float:
        """The noise std over the sensitivity, as the accountant takes it: z under add/remove, z / 2
        under replacement (one client's update can move by 2S)."""
        return self.noise_multiplier / (2.0 if self.adjacency == "replace" else 1.0)

    def epsilon(self, steps: int, *, sampled: bool = True) -> float:
        """Epsilon at ``delta`` after ``steps`` rounds with uploads: with ``sampled``, amplified by the
        sampling rate (against an observer who does not know which clients were sampled); without, every
        one of the ``steps`` counted as a release (against the server, which samples the clients and sees
        each upload; pass the rounds the client took part in)."""
        q = self.sample_rate if sampled else 1.0
        return epsilon(self.accounted_multiplier, q, steps, self.delta, self.accountant)

    def transform(self, run_seed: int, initial: Mapping[str, torch.Tensor]) -> GaussianUpdate:
        """The upload transform that clips and noises every client's upload."""
        return GaussianUpdate(self.clip_norm, self.noise_multiplier, run_seed, initial)

    def record(self) -> dict[str, Any]:
        """The settings as the run summary records them (JSON-ready)."""
        return {
            "clip_norm": self.clip_norm,
            "noise_multiplier": self.noise_multiplier,
            "target_epsilon": self.target_epsilon,
            "delta": self.delta,
            "accountant": self.accountant,
            "adjacency": self.adjacency,
            "sample_rate": self.sample_rate,
            "planned_rounds": self.planned_rounds,
        }


def privacy_settings(config: ExperimentConfig) -> PrivacySettings | None:
    """The run's resolved privacy, or None when ``privacy.clip_norm`` is unset (privacy off).

    With ``privacy.target_epsilon``, z is the smallest multiplier (Opacus's search) whose epsilon after
    ``federation.rounds`` rounds (every round of every federated method uploads, warm-up included) at the
    sampling rate reaches the target at ``privacy.delta``; the same on every machine of a run.
    """
    p = config.privacy
    if p.clip_norm is None:
        return None
    q = sampling_rate(config)
    rounds = config.federation.rounds
    factor = 2.0 if p.adjacency == "replace" else 1.0
    if p.target_epsilon is not None:
        z = factor * noise_multiplier_for(p.target_epsilon, p.delta, q, rounds, p.accountant)
    else:
        assert p.noise_multiplier is not None  # the config's validator asks for one of the two
        z = p.noise_multiplier
    return PrivacySettings(
        clip_norm=p.clip_norm,
        noise_multiplier=z,
        delta=p.delta,
        accountant=p.accountant,
        adjacency=p.adjacency,
        sample_rate=q,
        target_epsilon=p.target_epsilon,
        planned_rounds=rounds,
    )
