"""Step 2 of FedTreeLoRA: per-layer distances between clients from their LoRA B matrices."""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from fedtreelora.core.checks import as_float_array, is_torch_tensor, require_finite

if TYPE_CHECKING:
    from typing import TypeGuard

    import torch

METRICS = ("frobenius", "cosine")


# One arithmetic for both array modules: numpy for numpy input (the default, ``federation.server_device``
# unset), torch on the tensors' device under ``server_device``. Numpy stays the CPU path because it is
# faster there: torch float64 on the CPU took distances 3.4-6.2x as long at 8, 20 and 100 clients
# (RoBERTa-large shapes, one thread; ``python benchmarks/bench_planning.py --compare``).
def _distances_from_gram(xp: ModuleType, gram: Any, metric: str) -> Any:
    """Distances between rows from their Gram matrix, written once for ``xp`` = numpy or torch.

    Args:
        xp: the array module of ``gram`` (numpy, or torch for a tensor on any device).
        gram: (..., clients, clients) float64 inner products of the flattened matrices.
    Returns:
        (..., clients, clients), symmetric; the diagonal is left to the caller to zero.
    """
    sq_norms = xp.einsum("...ii->...i", gram)
    if metric == "frobenius":
        dist = xp.sqrt((sq_norms[..., :, None] + sq_norms[..., None, :] - 2.0 * gram).clip(min=0.0))
    else:
        norms = xp.sqrt(sq_norms)
        denom = norms[..., :, None] * norms[..., None, :]
        # A zero matrix has no direction: call it orthogonal to everything (similarity 0).
        positive = denom > 0
        cos = xp.where(positive, gram / xp.where(positive, denom, 1.0), 0.0)
        dist = 1.0 - cos.clip(-1.0, 1.0)
    return 0.5 * (dist + dist.swapaxes(-1, -2))


def _layer_distances_torch(modules: list[torch.Tensor], metric: str) -> np.ndarray:
    """:func:`layer_distances` for torch tensors: Gram matrices on the tensors' device (e.g. a GPU),
    one batched matmul per module over all layers. Each module is (clients, layers, d_out, rank)."""
    import torch  # only here: the numpy path must not load torch

    n, layers = modules[0].shape[:2]
    out = torch.zeros(layers, n, n, dtype=torch.float64, device=modules[0].device)
    for m, x in enumerate(modules):
        if x.dim() != 4 or tuple(x.shape[:2]) != (n, layers):
            raise ValueError(f"b[{m}] must be (clients, layers, d_out, rank) with (clients, layers) = {(n, layers)}")
        if not torch.isfinite(x).all():
            raise ValueError(f"b[{m}] must be finite")
        flat = x.reshape(n, layers, -1).transpose(0, 1)  # (layers, clients, features)
        out += _distances_from_gram(torch, (flat @ flat.transpose(1, 2)).double(), metric)
    out /= len(modules)
    out.diagonal(dim1=1, dim2=2).zero_()
    return out.cpu().numpy()


def _is_torch_sequence(b: object) -> TypeGuard[Sequence[torch.Tensor]]:
    """Whether ``b`` is a non-empty list or tuple of torch tensors (its first item tells)."""
    return isinstance(b, (list, tuple)) and bool(b) and is_torch_tensor(b[0])


def layer_distances(
    b: np.ndarray | torch.Tensor | Sequence[np.ndarray] | Sequence[torch.Tensor], metric: str = "frobenius"
) -> np.ndarray:
    """Distances between clients at every layer, from their LoRA B matrices.

    ``D[l, i, j] = mean over modules m of dist(b[i, l, m], b[j, l, m])`` where ``dist`` is the
    Frobenius norm of the difference (``metric="frobenius"``) or one minus the cosine similarity of
    the flattened matrices (``metric="cosine"``).

    Args:
        b: (clients, layers, modules, d_out, rank) array or torch tensor (torch: computed on its
            device, e.g. a GPU), or a sequence with one
            (clients, layers, d_out_m, rank) array per module when modules differ in shape
            (e.g. grouped-query attention, where ``v_proj`` is narrower than ``q_proj``).
        metric: ``"frobenius"`` or ``"cosine"``.

    Returns:
        (layers, clients, clients) float64: symmetric, zero diagonal, non-negative.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if is_torch_tensor(b):
        return _layer_distances_torch(list(b.unbind(2)), metric)
    if _is_torch_sequence(b):
        return _layer_distances_torch(list(b), metric)
    if isinstance(b, (list, tuple)):
        if len(b) == 0:
            raise ValueError("b must hold at least one module; got an empty sequence")
        modules = [as_float_array(x, f"b[{m}]", 4) for m, x in enumerate(b)]
        head = modules[0].shape[:2]
        for m, x in enumerate(modules):
            if x.shape[:2] != head:
                raise ValueError(
                    f"b[{m}] has (clients, layers) = {x.shape[:2]} but b[0] has {head}; every module "
                    "must cover the same clients and layers"
                )
    else:
        arr = as_float_array(b, "b", 5)
        modules = [arr[:, :, m] for m in range(arr.shape[2])]
        if not modules:
            raise ValueError(f"b must hold at least one module; got shape {arr.shape}")
    n_clients, n_layers = modules[0].shape[:2]
    if n_clients < 1 or n_layers < 1:
        raise ValueError(
            f"b must hold at least one client and one layer; got (clients, layers) = {(n_clients, n_layers)}"
        )
    out = np.zeros((n_layers, n_clients, n_clients))
    for m, x in enumerate(modules):
        require_finite(x, f"b[{m}]" if isinstance(b, (list, tuple)) else "b")
        flat = x.reshape(n_clients, n_layers, -1)
        for layer in range(n_layers):
            out[layer] += _distances_from_gram(np, flat[:, layer] @ flat[:, layer].T, metric)
    out /= len(modules)
    for layer in range(n_layers):
        np.fill_diagonal(out[layer], 0.0)
    return out
