"""Privacy accounting of the Gaussian mechanism on client updates, through Opacus's accountants.

A client's upload in one round is one release of the Gaussian mechanism with sensitivity S (its
clipped update) and noise std z * S; over the rounds these compose, and when the adversary does not
know which clients were sampled, sampling at rate q amplifies them. Opacus's RDP and PRV accountants
compute the resulting epsilon at a given delta (``opacus.accountants``); the numbers here are theirs.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np

__all__ = ["ACCOUNTANTS", "epsilon", "noise_multiplier_for"]

ACCOUNTANTS = ("rdp", "prv")
"""Opacus's accountants offered: ``rdp`` (Renyi DP, Mironov 2017; an upper bound, fast) and ``prv``
(privacy random variables, Gopi et al. 2021; tighter, numerical)."""


@functools.lru_cache(maxsize=4096)
def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` after ``steps`` releases of the subsampled Gaussian mechanism.

    Args:
        noise_multiplier: z, the noise std over the sensitivity (0: no privacy, epsilon is inf).
        sample_rate: q in (0, 1], the probability that a client takes part in a step (1: every step).
        steps: the number of releases (rounds with uploads); 0 gives 0.
        delta: the delta of the (epsilon, delta) guarantee, in (0, 1).
        accountant: ``rdp`` or ``prv`` (:data:`ACCOUNTANTS`).
    Returns:
        epsilon (float; ``inf`` for ``noise_multiplier`` 0 and steps > 0).
    """
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; choose one of {list(ACCOUNTANTS)}")
    if steps < 0 or not 0 < sample_rate <= 1 or not 0 < delta < 1 or noise_multiplier < 0:
        raise ValueError(
            f"epsilon needs steps >= 0, 0 < sample_rate <= 1, 0 < delta < 1 and noise_multiplier >= 0; got "
            f"steps={steps}, sample_rate={sample_rate}, delta={delta}, noise_multiplier={noise_multiplier}"
        )
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    # Opacus's PRV takes log(1 - q), which is -inf (and harmless) at q = 1.
    with np.errstate(divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(acc.get_epsilon(delta=float(delta)))


@functools.lru_cache(maxsize=256)
def noise_multiplier_for(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """The smallest noise multiplier (to within Opacus's 0.01 epsilon tolerance, from above) whose
    epsilon after ``steps`` releases at ``sample_rate`` is at most ``target_epsilon`` at ``delta``
    (``opacus.accountants.utils.get_noise_multiplier``).

    Raises:
        ValueError: the target cannot be met (Opacus gives up above a multiplier of 1e6).
    """
    if steps < 1:
        raise ValueError(f"a target epsilon needs at least one round with uploads, got steps={steps}")
    from opacus.accountants.utils import get_noise_multiplier

    with np.errstate(divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        # The search tries multipliers far above the answer, where RDP's best order is its largest.
        warnings.filterwarnings("ignore", "Optimal order is the largest alpha", UserWarning)
        return float(
            get_noise_multiplier(
                target_epsilon=float(target_epsilon),
                target_delta=float(delta),
                sample_rate=float(sample_rate),
                steps=int(steps),
                accountant=accountant,
            )
        )
