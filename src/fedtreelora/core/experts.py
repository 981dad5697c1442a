"""Step 5 of FedTreeLoRA: each client's cluster expert and external expert, factor by factor."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, overload

import numpy as np

from fedtreelora.core.checks import as_float_array, is_torch_tensor, require_finite

if TYPE_CHECKING:
    import torch

Array = Any
"""A numpy array or a torch tensor inside :func:`_group_means`, whose one arithmetic serves both through
its array module ``xp``: the two libraries' type stubs share no protocol to name, hence Any."""


@overload
def group_means_for(
    values: np.ndarray, labels: np.ndarray, target_labels: np.ndarray, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]: ...


@overload
def group_means_for(
    values: torch.Tensor, labels: np.ndarray, target_labels: np.ndarray, weights: np.ndarray | None = None
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]: ...


def group_means_for(
    values: np.ndarray | torch.Tensor,
    labels: np.ndarray,
    target_labels: np.ndarray,
    weights: np.ndarray | None = None,
) -> tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor, np.ndarray, np.ndarray]:
    """For targets in given clusters, the (weighted) mean of ``values`` over that cluster and over all
    other clusters. Targets need not be among the clients that supplied ``values`` (a client that
    missed a round still gets its cluster's experts from those who took part).

    Args:
        values: (clients, ...) one tensor per supplying client; a numpy array (computed in float64) or a
            torch tensor (computed on its device, in its dtype, and returned as torch tensors).
        labels: (clients,) cluster id of each supplying client.
        target_labels: (targets,) cluster id of each target.
        weights: (clients,) non-negative, e.g. example counts; None for an unweighted mean.

    Returns:
        ``(inside, outside, has_inside, has_outside)``: means (targets, ...) and (targets,) bool masks
        saying whether any supplier was inside / outside the target's cluster (the mean is zero where not).
    """
    n = values.shape[0]
    _, member = np.unique(np.concatenate([labels, target_labels]), return_inverse=True)
    clusters = np.arange(int(member.max()) + 1)
    if is_torch_tensor(values):
        import torch  # only here: numpy callers must not load torch

        device, dtype = values.device, values.dtype
        w_t = (
            torch.ones(n, device=device, dtype=dtype)
            if weights is None
            else torch.as_tensor(weights, device=device, dtype=dtype)
        )
        member_t, clusters_t = (torch.as_tensor(x, device=device) for x in (member, clusters))
        inside, outside, has_inside, has_outside = _group_means(torch, values.reshape(n, -1), w_t, member_t, clusters_t)
        has_inside, has_outside = has_inside.cpu().numpy(), has_outside.cpu().numpy()
    else:
        w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
        flat = values.reshape(n, -1).astype(np.float64, copy=False)
        inside, outside, has_inside, has_outside = _group_means(np, flat, w, member, clusters)
    shape = (len(target_labels), *values.shape[1:])
    return inside.reshape(shape), outside.reshape(shape), has_inside, has_outside


# One arithmetic for both array modules: numpy for numpy input (the default, ``federation.server_device``
# unset), torch on the tensors' device under ``server_device``. Numpy stays the CPU path because it is
# faster there: torch float64 on the CPU took expert averages 1.35-1.7x as long at 8, 20 and 100 clients
# (RoBERTa-large shapes, one thread; ``python benchmarks/bench_planning.py --compare``).
def _group_means(
    xp: ModuleType, flat: Array, w: Array, member: Array, clusters: Array
) -> tuple[Array, Array, Array, Array]:
    """:func:`group_means_for` on flattened values, written once for ``xp`` = numpy or torch.

    Args:
        xp: the array module of every argument (numpy arrays, or torch tensors on one device).
        flat: (clients, size) values, float64 for numpy.
        w: (clients,) weights in ``flat``'s dtype.
        member: (clients + targets,) cluster index of each supplier, then of each target.
        clusters: (clusters,) 0..clusters-1.

    Returns:
        ``(inside, outside, has_inside, has_outside)``: (targets, size) means and (targets,) bool masks.
    """
    n = flat.shape[0]
    member_src, member_tgt = member[:n], member[n:]
    one_hot = (clusters[:, None] == member_src[None, :]) * w  # (clusters, clients): w where a member, else 0
    # Cluster sums cost O(clusters x clients x size), not the O(clients^2 x size) of a weight matrix.
    sums = one_hot @ flat  # (clusters, size)
    weight = one_hot.sum(axis=1)  # (clusters,)
    tol = 1e-12 * max(float(w.sum()), 1.0)
    in_weight = weight[member_tgt]
    out_weight = w.sum() - in_weight
    has_inside, has_outside = in_weight > tol, out_weight > tol
    own_sums = sums[member_tgt]  # (targets, size)
    inside = own_sums / xp.where(has_inside, in_weight, 1.0)[:, None]
    inside[~has_inside] = 0.0
    total = flat.T @ w  # (size,)
    outside = (total - own_sums) / xp.where(has_outside, out_weight, 1.0)[:, None]
    outside[~has_outside] = 0.0
    return inside, outside, has_inside, has_outside


@overload
def group_means(
    values: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]: ...


@overload
def group_means(
    values: torch.Tensor, labels: np.ndarray, weights: np.ndarray | None = None
) -> tuple[torch.Tensor, torch.Tensor]: ...


def group_means(
    values: np.ndarray | torch.Tensor, labels: np.ndarray, weights: np.ndarray | None = None
) -> tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]:
    """Per client, the (weighted) mean of ``values`` over its own cluster and over everyone else.

    Args:
        values: (clients, ...) one tensor per client: a numpy array, or a torch tensor (as
            :func:`group_means_for`).
        labels: (clients,) cluster id of every client.
        weights: (clients,) non-negative, e.g. example counts; None for an unweighted mean.

    Returns:
        ``(inside, outside)``, both (clients, ...): ``inside[k]`` averages the members of k's cluster
        (k included); ``outside[k]`` averages all other clients, and is zero when k's cluster is
        everyone.
    """
    inside, outside, _, _ = group_means_for(values, labels, labels, weights)
    return inside, outside


@dataclass(frozen=True)
class Experts:
    """Cluster and external experts for every client (shapes as the uploads).

    Attributes:
        cluster_a: (clients, layers, modules, rank, d_in)
        cluster_b: (clients, layers, modules, d_out, rank)
        external_a: (clients, layers, modules, rank, d_in), zero where the client's cluster is everyone
        external_b: (clients, layers, modules, d_out, rank), likewise
    """

    cluster_a: np.ndarray
    cluster_b: np.ndarray
    external_a: np.ndarray
    external_b: np.ndarray


def _check_weights(weights: object, n_clients: int) -> np.ndarray | None:
    if weights is None:
        return None
    w = as_float_array(weights, "weights", 1)
    if w.shape[0] != n_clients:
        raise ValueError(f"weights must have one entry per client ({n_clients}), got {w.shape[0]}")
    require_finite(w, "weights")
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be non-negative with a positive sum (e.g. example counts)")
    return w


def aggregate_experts(a: np.ndarray, b: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> Experts:
    """Average every client's uploaded LoRA factors into its cluster expert and its external expert.

    For client k at layer l: S = k's cluster in ``labels[l]``, R = everyone else. The cluster expert
    is the mean over S of A and, separately, of B; the external expert the same over R (zero when R
    is empty). Factors are averaged separately, as in FedIT.

    Args:
        a: (clients, layers, modules, rank, d_in) uploaded A matrices.
        b: (clients, layers, modules, d_out, rank) uploaded B matrices.
        labels: (layers, clients) cluster ids, e.g. ``SharingPlan.labels``.
        weights: (clients,) e.g. example counts; None (default) for unweighted means as in the paper.

    Returns:
        :class:`Experts` with a leading client axis.
    """
    a = as_float_array(a, "a", 5)
    b = as_float_array(b, "b", 5)
    labels_arr = np.asarray(labels)
    if labels_arr.ndim != 2:
        raise ValueError(f"labels must have shape (layers, clients), got {labels_arr.shape}")
    if a.shape[:3] != b.shape[:3]:
        raise ValueError(f"a and b must agree on (clients, layers, modules); got {a.shape[:3]} and {b.shape[:3]}")
    if a.shape[3] != b.shape[4]:
        raise ValueError(f"a's rank (axis 3) is {a.shape[3]} but b's rank (axis 4) is {b.shape[4]}")
    n_clients, n_layers = a.shape[:2]
    if labels_arr.shape != (n_layers, n_clients):
        raise ValueError(
            f"labels must have shape (layers, clients) = {(n_layers, n_clients)} to match a and b, "
            f"got {labels_arr.shape}"
        )
    require_finite(a, "a")
    require_finite(b, "b")
    w = _check_weights(weights, n_clients)
    cluster_a, external_a = np.zeros_like(a), np.zeros_like(a)
    cluster_b, external_b = np.zeros_like(b), np.zeros_like(b)
    for layer in range(n_layers):
        cluster_a[:, layer], external_a[:, layer] = group_means(a[:, layer], labels_arr[layer], w)
        cluster_b[:, layer], external_b[:, layer] = group_means(b[:, layer], labels_arr[layer], w)
    return Experts(cluster_a, cluster_b, external_a, external_b)
