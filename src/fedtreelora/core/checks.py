"""Input checks shared by the core algorithm: fail at the door with a message naming the argument."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from typing_extensions import TypeIs


def is_torch_tensor(value: object) -> TypeIs[torch.Tensor]:
    """Whether ``value`` is a ``torch.Tensor``, without importing torch: a value can only be a tensor once
    torch is loaded, so a numpy-only caller (the configuration, the CLI's listings) never pays for it."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def as_float_array(value: object, name: str, ndim: int) -> np.ndarray:
    """Return ``value`` as a float64 array with ``ndim`` dimensions, or raise ``ValueError``.

    The message names ``name``, the expected number of dimensions and what was received.
    """
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric array; could not convert it: {exc}") from exc
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got {array.ndim} with shape {array.shape}")
    return array


def require_finite(array: np.ndarray, name: str) -> None:
    """Raise ``ValueError`` if ``array`` holds NaN or Inf, saying where the first one is."""
    bad = ~np.isfinite(array)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name} must be finite; found {array[where]} at index {where}")


def require_distance_stack(distances: np.ndarray, name: str = "distances", atol: float = 1e-8) -> None:
    """Check a (layers, clients, clients) stack of distance matrices.

    Each matrix must be finite, non-negative, symmetric and have a zero diagonal.
    """
    if distances.shape[1] != distances.shape[2]:
        raise ValueError(f"{name} must have shape (layers, clients, clients); got {distances.shape} (last two differ)")
    if distances.shape[0] < 1:
        raise ValueError(f"{name} must hold at least one layer; got shape {distances.shape}")
    require_finite(distances, name)
    if (distances < -atol).any():
        raise ValueError(f"{name} must be non-negative; minimum is {distances.min()}")
    asym = np.abs(distances - distances.transpose(0, 2, 1)).max(initial=0.0)
    scale = max(1.0, float(np.abs(distances).max(initial=0.0)))
    if asym > atol * scale:
        layer = int(np.abs(distances - distances.transpose(0, 2, 1)).max(axis=(1, 2)).argmax())
        raise ValueError(
            f"{name} must be symmetric in its last two axes; layer {layer} differs from its transpose by {asym}"
        )
    diag = np.abs(np.diagonal(distances, axis1=1, axis2=2)).max(initial=0.0)
    if diag > atol * scale:
        raise ValueError(f"{name} must have a zero diagonal (a client is at distance 0 from itself); max is {diag}")


def require_positive_int(value: object, name: str, minimum: int = 1) -> int:
    """Return ``value`` as int if it is an integer >= ``minimum``; else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)
