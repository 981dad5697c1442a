"""``tau = "auto"``: each layer's cut chosen by a relabelling test instead of a hand-tuned tau.

With a number, tau is the score of full sharing: a layer leaves the root only when some partition's
silhouette beats it. ``"auto"`` replaces that prior with a test. At layer l, for each candidate count
c above the previous layer's count p (within the window), it asks whether the layer's distances are
grouped along a c-cluster partition more than they would be if the clients were relabelled at random
(within the clusters of the previous layer's partition, so a finer cut is tested for what it adds):

1. **Statistic.** The mean silhouette, under ``distances[l]``, of the exactly-c cut of a tree built
   *without layer l*: average linkage (or the plan's linkage) on the mean distance over the other
   layers. Testing the one tree's own cut would be circular: the one tree is fitted to the layer-mean
   distance, which contains layer l, so its cuts beat random partitions of layer l even when no layer
   has any structure (for 10-20 i.i.d. Gaussian clients over 6 layers, the one tree's 2- and 3-cuts
   beat the 95th percentile of their random relabellings at about 8% and 20% of the layers instead of
   5%; with a single layer the 3-cut nearly always does). Leaving layer l out makes the tested
   partition independent of layer l's distances, so relabelling gives an exact null.
2. **Null.** ``permutations`` random relabellings of the tested partition, each client's label moved
   only within its cluster of the previous partition (all clients at c_{l-1} = 1): same cluster sizes,
   same parent structure, no alignment with layer l's distances beyond the parent's.
3. **Own null, one level.** Each candidate is compared with the null of its *own* silhouette, not with
   a shared threshold: silhouettes of random partitions depend on c and on the cluster sizes (more
   clusters, or singleton clusters, which score 0, pull the null down and narrow it), so one number
   (tau) would favour some counts over others. The candidates of a layer are tested jointly (max-T):
   ``t_l`` is the ``level`` quantile, over the relabellings, of the largest standardised null silhouette
   among the layer's candidates, and candidate c's critical value (its null quantile) is
   ``mean_c + t_l * sd_c`` of its own null. With one candidate this is exactly the ``level`` quantile of
   its null. A candidate passes at layer l when its statistic exceeds its null quantile (strictly; a
   relabelling that reproduces the tested partition ties and does not count as beating it).
4. **Every deeper layer must agree.** Cuts never coarsen with depth, so a split at layer l is imposed
   on every deeper layer. A candidate is *admissible* at layer l only when it passes at layer l and at
   every deeper layer (each tested against the same previous partition). Read from the deepest layer
   up, this is a fixed-sequence procedure: an unsupported split needs a pass at the deepest layer
   without structure, so the chance that the plan makes any split the data do not support (for a
   federation of exchangeable clients: any split at all) stays at most ``1 - level`` (up to Monte Carlo
   error), with every layer tested at the full level rather than a share of it.

The layer then picks among its admissible candidates and the previous count p (always allowed; for
p >= 2 it competes with its silhouette, for p = 1 it is the fallback) as the numeric rule does: the
best mean silhouette of the one tree's cut under the layer's distances, ties to fewer clusters. With
nothing admissible the layer keeps p. Candidates are cuts of the one tree, so nesting and the window
hold by construction.

Edge cases: N <= 2 has no candidate (c = 1 everywhere); a single layer has no other layer to build the
tested partition from, so nothing is admissible (c = 1), and more generally structure that only one
layer carries is not seen; relabellings that leave too few distinct partitions (tiny clusters: with
five clients or fewer there are at most 15) cannot reach the level and never pass, which is the honest
answer. Singleton clusters score 0 in the statistic and in every relabelling alike.

Cost: per stage (a run of layers at the same previous count), one batched silhouette per later layer
and candidate over ``permutations`` relabellings, plus one tree per layer built once. Deterministic:
every relabelling comes from ``numpy.random.default_rng((seed, stage start, p, layer))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from fedtreelora.core.tree import build_tree, cut_exact

DEFAULT_LEVEL = 0.95
"""Default level: the chance that a federation without structure keeps every layer shared."""
DEFAULT_PERMUTATIONS = 999
"""Default number of random relabellings per layer and stage."""
_CHUNK_ELEMENTS = 2_000_000  # draws x clients x clusters held at once by the batched silhouette


def check_auto_settings(level: float, permutations: int) -> tuple[float, int]:
    """Validate the test's level and relabelling count; return them as (float, int).

    ``permutations`` must be large enough for the ``level`` quantile to be one of the draws:
    ``ceil(level * (permutations + 1)) <= permutations`` (19 at level 0.95, 99 at 0.99).
    """
    if isinstance(level, bool) or not isinstance(level, (int, float, np.floating)) or not 0.0 < level < 1.0:
        raise ValueError(f"level must be a number in (0, 1), got {level!r}")
    if isinstance(permutations, bool) or not isinstance(permutations, (int, np.integer)) or permutations < 1:
        raise ValueError(f"permutations must be an integer >= 1, got {permutations!r}")
    if _quantile_rank(float(level), int(permutations)) > permutations:
        needed = next(p for p in range(1, 10**7) if _quantile_rank(float(level), p) <= p)
        raise ValueError(
            f"permutations={permutations} is too few for level={level}: the level quantile needs at least {needed}"
        )
    return float(level), int(permutations)


def _quantile_rank(level: float, permutations: int) -> int:
    """1-based rank, among the sorted draws, of the ``level`` quantile of a Monte Carlo null."""
    return max(1, math.ceil(level * (permutations + 1) - 1e-9))


def _critical(statistic: float, quantile: float, passes: bool) -> float:
    """The critical value to record, nudged by at most a rounding error so that ``statistic > quantile``
    reads exactly as the decision taken in standardised units."""
    if passes and not statistic > quantile:
        return float(np.nextafter(statistic, -np.inf))
    if not passes and statistic > quantile:
        return statistic
    return quantile


def batch_mean_silhouette(distances: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean silhouette of many partitions under one precomputed distance matrix.

    Matches :func:`fedtreelora.core.plan.mean_silhouette` (scikit-learn's convention): members of
    singleton clusters score 0, as do points whose intra- and nearest-cluster distances are both 0.

    Args:
        distances: (clients, clients).
        labels: (draws, clients) int, each row using every id in 0..c-1 (c >= 2, the same c for all rows).
    Returns:
        (draws,) float64.
    """
    labels = np.asarray(labels, dtype=np.int64)
    draws, n = labels.shape
    c = int(labels.max()) + 1
    out = np.empty(draws)
    step = max(1, _CHUNK_ELEMENTS // max(1, n * c))
    for lo in range(0, draws, step):
        lab = labels[lo : lo + step]
        onehot = np.zeros((lab.shape[0], n, c))
        np.put_along_axis(onehot, lab[:, :, None], 1.0, axis=2)
        sums = distances[None] @ onehot  # (draws, clients, clusters): distance to each cluster
        sizes = onehot.sum(axis=1)  # (draws, clusters)
        own_size = np.take_along_axis(sizes, lab, axis=1)
        intra = np.take_along_axis(sums, lab[:, :, None], axis=2)[:, :, 0]
        with np.errstate(divide="ignore", invalid="ignore"):
            a = intra / (own_size - 1)
            mean_to = sums / sizes[:, None, :]
        np.put_along_axis(mean_to, lab[:, :, None], np.inf, axis=2)
        b = mean_to.min(axis=2)
        with np.errstate(divide="ignore", invalid="ignore"):
            s = (b - a) / np.maximum(a, b)
        s = np.where(np.isfinite(s) & (own_size > 1), s, 0.0)
        out[lo : lo + step] = s.mean(axis=1)
    return out


@dataclass
class StageTests:
    """The relabelling tests of one stage: layers ``start..L-1`` against one previous partition.

    Attributes:
        statistics: layer -> candidate -> mean silhouette of the held-out tree's cut under the layer.
        quantiles: layer -> candidate -> critical value (its null quantile at the layer's level).
        admissible: layer -> candidates that pass at this layer and at every deeper layer.
    """

    statistics: dict[int, dict[int, float]] = field(default_factory=dict)
    quantiles: dict[int, dict[int, float]] = field(default_factory=dict)
    admissible: dict[int, list[int]] = field(default_factory=dict)


class RelabellingTest:
    """Tests of candidate cuts against random relabellings, for one (layers, clients, clients) stack.

    Holds one held-out tree per layer (the tree of the mean distance over the other layers), built on
    first use, and runs :meth:`stage` for each previous partition the plan reaches.
    """

    def __init__(
        self,
        distances: np.ndarray,
        level: float = DEFAULT_LEVEL,
        permutations: int = DEFAULT_PERMUTATIONS,
        seed: int = 0,
        linkage_method: str = "average",
    ) -> None:
        self.distances = distances
        self.level, self.permutations = check_auto_settings(level, permutations)
        self.seed = int(seed)
        self.linkage_method = linkage_method
        self._total = distances.sum(axis=0)
        self._trees: dict[int, np.ndarray] = {}
        self._cuts: dict[tuple[int, int], np.ndarray] = {}

    @property
    def num_layers(self) -> int:
        return int(self.distances.shape[0])

    def held_out_cut(self, layer: int, n_clusters: int) -> np.ndarray:
        """The exactly-c cut of the tree built from every layer but ``layer``."""
        key = (layer, n_clusters)
        if key not in self._cuts:
            if layer not in self._trees:
                others = (self._total - self.distances[layer]) / (self.num_layers - 1)
                self._trees[layer] = build_tree(others, method=self.linkage_method)
            self._cuts[key] = cut_exact(self._trees[layer], self.distances.shape[1], n_clusters)
        return self._cuts[key]

    def stage(self, parent: np.ndarray, start: int, counts: list[int]) -> StageTests:
        """Test ``counts`` (all above the parent's count) at layers ``start..L-1`` against ``parent``.

        Args:
            parent: (clients,) the previous partition; relabellings stay within its clusters.
            start: first layer of the stage.
            counts: candidate cluster counts, each in [2, clients - 1].
        """
        tests = StageTests()
        n_layers, n_clients, _ = self.distances.shape
        if not counts or n_layers < 2:
            return tests
        parent = np.asarray(parent, dtype=np.int64)
        order = np.argsort(parent, kind="stable")
        k = _quantile_rank(self.level, self.permutations)
        p = int(len(np.unique(parent)))
        passes: dict[int, set[int]] = {}
        for layer in range(start, n_layers):
            rng = np.random.default_rng((self.seed, start, p, layer))
            keys = parent[None, :] + rng.random((self.permutations, n_clients))
            perm = np.empty((self.permutations, n_clients), dtype=np.int64)
            perm[:, order] = np.argsort(keys, axis=1)  # each client swaps only within its parent cluster
            stats, mean, sd, z = {}, {}, {}, {}
            for c in counts:
                tested = self.held_out_cut(layer, c)
                both = np.vstack([tested[None], tested[perm]])  # row 0: observed; then the relabellings
                values = batch_mean_silhouette(self.distances[layer], both)
                stats[c], mean[c], sd[c] = float(values[0]), float(values[1:].mean()), float(values[1:].std())
                z[c] = (values - mean[c]) / (sd[c] if sd[c] > 0 else 1.0)  # standardised by its own null
            t = float(np.sort(np.max([z[c][1:] for c in counts], axis=0))[k - 1])
            # Decide in standardised units, where a relabelling equal to the observed partition ties
            # exactly (and so does not count as beating its null).
            passes[layer] = {c for c in counts if z[c][0] > t}
            tests.statistics[layer] = stats
            tests.quantiles[layer] = {c: _critical(stats[c], mean[c] + t * sd[c], c in passes[layer]) for c in counts}
        supported = set(counts)
        for layer in range(n_layers - 1, start - 1, -1):  # deepest first: a split must hold below it
            supported &= passes[layer]
            tests.admissible[layer] = sorted(supported)
        return tests
