"""Step 2 of FedTreeLoRA: per-layer distances between clients from their LoRA B matrices."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from fedtreelora.core.checks import as_float_array, is_torch_tensor, require_finite

if TYPE_CHECKING:
    import torch

METRICS = ("frobenius", "cosine")


def _pairwise(flat: np.ndarray, metric: str) -> np.ndarray:
    """Distances between rows through one Gram matrix (no Python loop over pairs).

    Args:
        flat: (clients, features) float64.
    Returns:
        (clients, clients), symmetric, zero diagonal.
    """
    gram = flat @ flat.T
    sq_norms = np.diag(gram).copy()
    if metric == "frobenius":
        dist = np.sqrt(np.maximum(sq_norms[:, None] + sq_norms[None, :] - 2.0 * gram, 0.0))
    else:
        norms = np.sqrt(sq_norms)
        denom = norms[:, None] * norms[None, :]
        # A zero matrix has no direction: call it orthogonal to everything (similarity 0).
        cos = np.divide(gram, denom, out=np.zeros_like(gram), where=denom > 0)
        dist = 1.0 - np.clip(cos, -1.0, 1.0)
    dist = 0.5 * (dist + dist.T)
    np.fill_diagonal(dist, 0.0)
    return dist


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
        gram = (flat @ flat.transpose(1, 2)).double()  # (layers, clients, clients)
        sq = torch.diagonal(gram, dim1=1, dim2=2)
        if metric == "frobenius":
            dist = (sq[:, :, None] + sq[:, None, :] - 2.0 * gram).clamp_min(0.0).sqrt()
        else:
            norms = sq.sqrt()
            denom = norms[:, :, None] * norms[:, None, :]
            cos = torch.where(denom > 0, gram / denom.clamp_min(1e-300), torch.zeros_like(gram))
            dist = 1.0 - cos.clamp(-1.0, 1.0)
        out += 0.5 * (dist + dist.transpose(1, 2))
    out /= len(modules)
    out.diagonal(dim1=1, dim2=2).zero_()
    return out.cpu().numpy()


def layer_distances(b: np.ndarray | Sequence[np.ndarray], metric: str = "frobenius") -> np.ndarray:
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
    if is_torch_tensor(b) or (isinstance(b, (list, tuple)) and b and is_torch_tensor(b[0])):
        return _layer_distances_torch(list(b.unbind(2)) if is_torch_tensor(b) else list(b), metric)
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
            out[layer] += _pairwise(flat[:, layer], metric)
    return out / len(modules)
