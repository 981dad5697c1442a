"""The slot vectors of secure aggregation (``privacy.secure_aggregation``): where a node puts its upload so
that one secure sum over all nodes gives every cluster's sum and count, how the server reads each cluster's
mean back, and SecAgg+'s clipping range. Numpy and torch only; the protocol is in :mod:`.secure`.

For each uploaded tensor x (shape S) of a layer with C clusters, a node sends a (C, *S) array that is
zero except ``[slot] = r * x``, and one count entry per tensor and cluster that is zero except
``[slot] = r * u`` (r: the client's averaging weight over the round's largest, 1 for uniform averaging;
u: half the clipping range). The sum of these arrays holds, per cluster, the sum of its members'
weighted uploads and their weight; the external expert is the total minus the cluster.

SecAgg+ clips each value to ``[-clip, clip]`` and quantises it to ``quantization_range`` levels with
stochastic rounding: each member's value is off by less than one step ``2 clip / levels``, so a cluster
mean (uniform weights) is off by less than one step; zeros (the other clusters' slots) quantise exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedtreelora.config import ExperimentConfig, PrivacyConfig

Tensors = dict[str, torch.Tensor]

#: bytes per value of a masked vector on the wire (SecAgg+ sends int64 arrays)
MASKED_VALUE_BYTES = 8


@dataclass(frozen=True)
class Slots:
    """Where one client's upload goes in the secure vector.

    Attributes:
        keys: the uploaded tensors' keys, in the order the vector holds them.
        slot: (keys,) the client's cluster at each key's layer.
        clusters: (keys,) the clusters at each key's layer.
        weight: r, the client's averaging weight over the round's largest (1 for uniform averaging).
        clipping_range: SecAgg+'s clipping range this round.
    """

    keys: tuple[str, ...]
    slot: tuple[int, ...]
    clusters: tuple[int, ...]
    weight: float
    clipping_range: float

    @property
    def count_unit(self) -> float:
        """u: a weight of 1 is counted as u (inside the clipping range, and exactly quantised)."""
        return self.clipping_range / 2

    def to_json(self) -> dict[str, Any]:
        """The slots as JSON-ready data (they travel in the node's instructions)."""
        return {
            "keys": list(self.keys),
            "slot": list(self.slot),
            "clusters": list(self.clusters),
            "weight": self.weight,
            "clipping-range": self.clipping_range,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Slots:
        """Inverse of :meth:`to_json`."""
        return cls(
            keys=tuple(str(k) for k in data["keys"]),
            slot=tuple(int(v) for v in data["slot"]),
            clusters=tuple(int(v) for v in data["clusters"]),
            weight=float(data["weight"]),
            clipping_range=float(data["clipping-range"]),
        )


def slot_vector(upload: Mapping[str, torch.Tensor], slots: Slots) -> tuple[list[np.ndarray], int]:
    """A node's secure vector: its weighted upload in its clusters' slots, then the counts.

    Args:
        upload: the client's upload (after every upload transform), ``slots.keys`` among its keys.
        slots: where its values go.

    Returns:
        ``(arrays, clipped)``: per key a (clusters, *shape) float64 array, zero except ``[slot] = r * x``,
        then one (sum of clusters,) count array, zero except ``r * u`` at each key's slot; and how many
        values lie outside the clipping range (SecAgg+ will clip them).
    """
    arrays: list[np.ndarray] = []
    counts: list[np.ndarray] = []
    clipped = 0
    for key, slot, clusters in zip(slots.keys, slots.slot, slots.clusters, strict=True):
        value = upload[key].detach().to("cpu", torch.float64).numpy() * slots.weight
        clipped += int((np.abs(value) > slots.clipping_range).sum())
        arr = np.zeros((clusters, *value.shape))
        arr[slot] = value
        arrays.append(arr)
        count = np.zeros(clusters)
        count[slot] = slots.weight * slots.count_unit
        counts.append(count)
    return [*arrays, np.concatenate(counts)], clipped


def masked_bytes(slots: Slots, shapes: Mapping[str, Sequence[int]]) -> int:
    """Bytes of a node's masked vector on the wire (int64 values: the slot arrays, the counts and
    SecAgg+'s weight factor), the secure counterpart of an upload's float32 bytes."""
    values = 1 + sum(c * (1 + math.prod(shapes[k])) for k, c in zip(slots.keys, slots.clusters, strict=True))
    return MASKED_VALUE_BYTES * values


def cluster_means(
    total: Sequence[np.ndarray], slots: Mapping[int, Slots], shapes: Mapping[str, Sequence[int]], levels: int
) -> dict[int, Tensors]:
    """Each contributing client's cluster mean, from the secure sum of the slot vectors.

    Args:
        total: the sum over the contributing clients of their :func:`slot_vector` arrays.
        slots: client -> its slots, for exactly the clients whose vectors are in ``total``.
        shapes: every key's tensor shape.
        levels: SecAgg+'s quantisation range (a count is off by less than one step per client).

    Returns:
        client -> {key: its cluster's weighted mean at the key's layer} (CPU float32 tensors).
    Raises:
        RuntimeError when the counts in the sum disagree with the contributors' weights.
    """
    first = next(iter(slots.values()))
    keys, clusters = first.keys, first.clusters
    counts = total[len(keys)]
    # One quantisation step, 2 clip / levels, is 4 / levels count units: each contribution is off by less.
    tolerance = 4.0 * len(slots) / levels + 1e-9
    offsets = np.cumsum([0, *clusters])
    means: dict[int, Tensors] = {k: {} for k in slots}
    for i, key in enumerate(keys):
        weight = np.zeros(clusters[i])
        for s in slots.values():
            weight[s.slot[i]] += s.weight
        counted = counts[offsets[i] : offsets[i + 1]] / first.count_unit
        if not np.allclose(counted, weight, rtol=0, atol=tolerance):
            raise RuntimeError(
                f"the secure sum counts weights {counted.round(4).tolist()} per cluster of {key!r} but the "
                f"contributing clients weigh {weight.tolist()}: the nodes and the server disagree on the slots"
            )
        mean = total[i] / np.where(weight > 0, weight, 1.0).reshape(-1, *([1] * len(shapes[key])))
        for k, s in slots.items():
            means[k][key] = torch.from_numpy(np.ascontiguousarray(mean[s.slot[i]])).float()
    return means


def clipping_range(
    privacy: PrivacyConfig,
    payloads: Sequence[Mapping[str, torch.Tensor]],
    initial_bound: float,
    lr: float,
    steps: int,
    noise_std: float = 0.0,
) -> float:
    """SecAgg+'s clipping range for a round: ``privacy.secure_clipping_range`` when set, else
    ``2 * (m + lr * steps + 6 * noise_std)``.

    Args:
        privacy: the run's privacy settings.
        payloads: what the server sends the round's clients (the factors they start from).
        initial_bound: the largest magnitude of the shared initialisation (A's bound 1 / sqrt(d_in)).
        lr: the factors' AdamW learning rate: a step moves a value by about lr at most.
        steps: the most local steps any of the round's clients takes.
        noise_std: the std of the DP noise on every uploaded value (0 without DP).
    """
    if privacy.secure_clipping_range is not None:
        return float(privacy.secure_clipping_range)
    known = max([initial_bound, *(float(t.abs().max()) for p in payloads for t in p.values() if t.numel())])
    return 2.0 * (known + lr * steps + 6.0 * noise_std)


def local_steps(config: ExperimentConfig, num_train: int) -> int:
    """Optimizer steps a client with ``num_train`` examples takes in a round."""
    train = config.train
    if train.local_steps is not None:
        return train.local_steps
    return train.local_epochs * -(-num_train // train.batch_size)
