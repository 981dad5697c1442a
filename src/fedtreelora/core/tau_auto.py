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
   same parent structure, no alignment with layer l's distances beyond the parent's. A relabelling null
   is discrete: when some candidate has fewer than ``2 / (1 - level)`` distinct relabellings (40 at
   0.95; two groups of three among six clients have 10, two of four among eight 35), the observed
   partition's own ties fill the top of it and even a perfect split cannot pass. Such a layer's null
   *rotates* instead: the layer's configuration (classical MDS of its distances) is rotated within
   each parent cluster as in step 5 and the fixed tested partition is scored on every rotation, which
   is continuous and exact when the parent's clients are Gaussian around its mean at that layer.
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
   on every deeper layer. A candidate passes the relabelling stage at layer l only when it passes at
   layer l and at every deeper layer (each tested against the same previous partition), read from the
   deepest layer up (a fixed-sequence procedure, every layer at the full level).
5. **Groups, not a continuum.** Relabelling is exact only when the clients are exchangeable at layer l
   given the other layers. Clients that differ in every layer without forming groups (a client's own
   offset, or its own B scale, from its data size or learning speed) break that: the other layers' tree
   then predicts layer l for every candidate, and the relabelling stage passes almost always (12
   clients, 6 layers: 30-75% of federations with a per-client offset split, 97% with a lognormal
   per-client scale). So once per stage the candidates must also show that the clients form groups.
   The stage's layers ``start..L-1`` are pooled (mean squared distance) and embedded by classical MDS.
   The statistic is, per candidate c, the mean silhouette of the c-cut of the configuration's own tree,
   after each client's own scale is divided out (the least-squares fit of ``log d2[i, j] = m + a_i +
   a_j``, then ``d2 / exp(a_i + a_j)``, re-embedded). The null rotates the clients' coordinates by
   Haar-random orthogonal matrices within each cluster of the previous partition (keeping each cluster's
   mean) and computes the same statistic, scales divided out anew, on every rotation. Rotation keeps the
   spectrum (how spread the clients are along each direction) and destroys discreteness: when the
   clients of a parent cluster are independent draws from one Gaussian of any covariance, the rotated
   configurations have exactly the observed one's distribution, and so does the statistic, a fixed
   function of the configuration. The stage is *grouped* when the largest standardised statistic over
   its candidates beats the ``level`` quantile of the same maximum over the rotations (max-T); only then
   is anything admissible, and the layer's count is left to the relabelling stage and the silhouette.

The guarantee: a federation without groups keeps every layer shared with probability at least
``level`` (up to Monte Carlo error) when its clients are exchangeable (relabelling, exact), and when
their B matrices (over all layers together) are Gaussian around per-client traits, whatever their
covariance across layers (rotation, exact). A per-client B *scale* is not Gaussian; dividing it out is
approximate. Measured (``tests/test_tau_auto.py``; 12 clients, 6 layers, window 3, 40 federations,
level 0.95, 199 draws): a per-client offset of 1 or 2 (noise 1) splits 2.5% and 10%; a lognormal
per-client scale splits none at sigma 0.1, 7.5% at 0.25, but 32.5% at 0.5 and 35% at 1 (scales from
e^-2 to e^2): a long-tailed spread of scales still reads as a group of large clients. Real clients of
equal data size are far inside that range (the fixtures' fitted scales: sd 0.02-0.04 in log units).
An earlier version divided the scales out of the observed configuration only and rotated the result:
it kept the lognormal federations shared (0% at sigma 0.5) but had almost no power (two planted groups
of six spread as much as the noise in three layers of six: found in 0 of 10 federations, now 9; the
real adapters below: p about 0.4, now 0.01), because the rotated configurations kept scale
differences that the observed one no longer had, which widened the null.
Per-client traits *and* groups together are not separated: once the stage is grouped, the relabelling
stage admits whatever the other layers predict, traits included.
Real adapters: eight clients in two domains of four (tests/data, B after 3 local rounds at lr 1e-3):
the tree without each layer cuts exactly the two domains, that cut beats its relabelling null at every
layer (silhouettes 0.08-0.16 against critical values 0.04-0.10), and the stage is grouped; every layer
splits along the domains (ARI 1.0). Six real clients in two groups of three (tweets, plain and
swapped labels; 10 distinct relabellings, so tested by rotation) split along the groups in every layer
with window 2 (with window 3 the grouping gate's maximum over 2 and 3 clusters is not beaten). Without
groups, six or eight i.i.d. clients tested this way split in at most 5% of federations (the tests).

The layer then picks among its admissible candidates and the previous count p (always allowed; for
p >= 2 it competes with its silhouette, for p = 1 it is the fallback) as the numeric rule does: the
best mean silhouette of the one tree's cut under the layer's distances, ties to fewer clusters. With
nothing admissible the layer keeps p. Candidates are cuts of the one tree, so nesting and the window
hold by construction.

Edge cases: N <= 2 has no candidate (c = 1 everywhere); a single layer has no other layer to build the
tested partition from, so nothing is admissible (c = 1), and more generally structure that only one
layer carries is not seen; where relabellings leave too few distinct partitions the layer is tested by
rotation (step 2), which rests on the Gaussian assumption instead of exchangeability alone.
Singleton clusters score 0 in the statistic and in every relabelling or rotation alike.

Cost: per stage (a run of layers at the same previous partition), one batched silhouette per later layer
and candidate over ``permutations`` relabellings, ``permutations`` rotations with one small tree each, plus
one tree per layer built once. Deterministic: every relabelling comes from
``numpy.random.default_rng((seed, stage start, p, layer))``, every rotation from the same with ``layer = L``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.cluster.hierarchy import fcluster, is_monotonic, linkage
from scipy.linalg import null_space
from scipy.spatial.distance import pdist, squareform
from scipy.stats import ortho_group

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
        distances: (clients, clients), or (draws, clients, clients): one matrix per row of ``labels``.
        labels: (draws, clients) int, each row using every id in 0..c-1 (c >= 2, the same c for all rows).
    Returns:
        (draws,) float64.
    """
    labels = np.asarray(labels, dtype=np.int64)
    per_draw = distances.ndim == 3
    draws, n = labels.shape
    c = int(labels.max()) + 1
    out = np.empty(draws)
    step = max(1, _CHUNK_ELEMENTS // max(1, n * c))
    for lo in range(0, draws, step):
        lab = labels[lo : lo + step]
        onehot = np.zeros((lab.shape[0], n, c))
        np.put_along_axis(onehot, lab[:, :, None], 1.0, axis=2)
        matrices = distances[lo : lo + step] if per_draw else distances[None]
        sums = matrices @ onehot  # (draws, clients, clusters): distance to each cluster
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


def classical_mds(squared: np.ndarray) -> np.ndarray:
    """Classical (Torgerson) MDS: coordinates whose pairwise squared distances best match ``squared``.

    Negative eigenvalues (from distances that are not exactly Euclidean) are set to 0.

    Args:
        squared: (clients, clients) squared distances, zero diagonal.
    Returns:
        (clients, clients) float64: one row of coordinates per client.
    """
    gram = -0.5 * (squared - squared.mean(axis=0) - squared.mean(axis=1)[:, None] + squared.mean())
    eigenvalues, vectors = np.linalg.eigh(gram)
    coordinates: np.ndarray = vectors * np.sqrt(np.clip(eigenvalues, 0.0, None))
    return coordinates


def pooled_configuration(distances: np.ndarray) -> np.ndarray:
    """The clients' joint structure over a run of layers, as coordinates: classical MDS of the mean
    squared distance over the layers.

    Args:
        distances: (layers, clients, clients).
    Returns:
        (clients, clients) float64.
    """
    return classical_mds(np.mean(distances**2, axis=0))


def divide_out_scales(squared: np.ndarray) -> np.ndarray:
    """Squared distances with each client's own scale divided out.

    Fits ``log d2[i, j] = m + a_i + a_j`` to the clients' pairs (least squares) and returns
    ``d2[i, j] / exp(a_i + a_j)``: a client whose B matrices are larger or noisier in every layer is far
    from everyone, which is a trait of that client, not a group.

    Args:
        squared: (clients, clients) squared distances, zero diagonal, at least 3 clients.
    Returns:
        (clients, clients) float64, zero diagonal.
    """
    n = squared.shape[0]
    off = ~np.eye(n, dtype=bool)
    if not np.any(squared[off] > 0):
        return np.zeros((n, n))
    logs = np.log(np.maximum(squared, squared[off].max() * 1e-12))  # identical clients: a floor, not -inf
    row = np.where(off, logs, 0.0).sum(axis=1) / (n - 1)
    effect = (row - logs[off].mean()) * (n - 1) / (n - 2)  # the least-squares a_i of the symmetric model
    out: np.ndarray = np.where(off, squared / np.exp(effect[:, None] + effect[None, :]), 0.0)
    return out


def client_configuration(distances: np.ndarray) -> np.ndarray:
    """The clients' joint structure over a run of layers, each client's scale divided out, as coordinates:
    :func:`divide_out_scales` of the mean squared distance, embedded by classical MDS.

    Args:
        distances: (layers, clients, clients), at least 3 clients.
    Returns:
        (clients, clients) float64: one row of coordinates per client.
    """
    return classical_mds(divide_out_scales(np.mean(distances**2, axis=0)))


def rotate_within(coordinates: np.ndarray, parent: np.ndarray, draws: int, rng: np.random.Generator) -> np.ndarray:
    """Random rotations of the clients' coordinates within each cluster of ``parent``.

    Each cluster's points keep their mean; their deviations from it are mixed by a Haar-random orthogonal
    matrix of the cluster's client space (one that fixes the cluster's all-ones vector). If the clients of
    a cluster are independent draws from one Gaussian (any covariance), the rotated configurations have
    the same distribution as the observed one; a discrete group structure does not survive the mixing.

    Args:
        coordinates: (clients, dims).
        parent: (clients,) int, the clusters to rotate within.
    Returns:
        (draws, clients, dims) float64.
    """
    out: np.ndarray = np.broadcast_to(coordinates, (draws, *coordinates.shape)).copy()
    for cluster in np.unique(parent):
        members = np.flatnonzero(parent == cluster)
        if len(members) < 2:
            continue
        basis = null_space(np.ones((1, len(members))))  # (members, members - 1), orthogonal to the mean
        dim = len(members) - 1
        haar = np.reshape(ortho_group.rvs(dim, size=draws, random_state=rng), (draws, dim, dim))
        points = coordinates[members]
        out[:, members] = points.mean(axis=0) + basis @ (haar @ (basis.T @ points))
    return out


def _min_distinct(level: float) -> int:
    """Fewest distinct relabellings for which the relabelling null is used: ``2 / (1 - level)`` (40 at
    level 0.95). With fewer, the observed partition's own ties fill the top of the null and it can pass
    at best by chance (10 relabellings of 3 + 3 never pass at 0.95; 20 pass about half the time)."""
    return math.ceil(2.0 / (1.0 - level) - 1e-9)


def distinct_partitions(labels: np.ndarray) -> int:
    """Number of distinct partitions among the rows of ``labels`` (cluster ids up to renaming).

    Args:
        labels: (draws, clients) int.
    """
    labels = np.asarray(labels, dtype=np.int64)
    draws, n = labels.shape
    c = int(labels.max()) + 1
    first = np.full((draws, c), n, dtype=np.int64)  # each cluster's first member; n for an absent id
    np.minimum.at(first, (np.repeat(np.arange(draws), n), labels.ravel()), np.tile(np.arange(n), draws))
    rank = np.argsort(np.argsort(first, axis=1), axis=1)  # ids renamed in order of first appearance
    canonical = np.take_along_axis(rank, labels, axis=1)
    return int(len(np.unique(canonical, axis=0)))


def rotated_distances(distances: np.ndarray, parent: np.ndarray, draws: int, stream: tuple[int, ...]) -> np.ndarray:
    """One layer's distances, observed and under random rotations within ``parent``'s clusters.

    The layer's classical MDS configuration (exact for Frobenius distances, which are Euclidean) is
    rotated by :func:`rotate_within`; each configuration's Euclidean distances are returned, the
    unrotated one first. This is the null of a fixed partition's silhouette when the clients of each
    parent cluster are Gaussian around its mean at this layer: continuous, so it can reach any level
    however few the clients.

    Args:
        distances: (clients, clients) the layer's distances.
        parent: (clients,) int, the previous partition.
        draws: number of rotations.
        stream: seed of the rotations' generator.
    Returns:
        (draws + 1, clients, clients) float64.
    """
    configuration = classical_mds(distances**2)
    rng = np.random.default_rng((*stream, 1))  # its own stream: the relabellings' draws stay as they were
    points = np.concatenate([configuration[None], rotate_within(configuration, parent, draws, rng)])
    squared = np.sum((points[:, :, None, :] - points[:, None, :, :]) ** 2, axis=3)
    out: np.ndarray = np.sqrt(squared)
    return out


def _cut_many(tree: np.ndarray, n_clients: int, n_clusters: int) -> np.ndarray:
    """A partition equal to ``cut_exact``'s (ids may differ), through the faster ``fcluster`` when merge
    heights neither tie nor decrease (where a height threshold and the merge order cut alike)."""
    if not is_monotonic(tree):
        return cut_exact(tree, n_clients, n_clusters)
    labels: np.ndarray = fcluster(tree, n_clusters, criterion="maxclust") - 1
    if labels.max() + 1 != n_clusters:
        return cut_exact(tree, n_clients, n_clusters)
    return labels.astype(np.int64)


def grouping_silhouettes(configurations: np.ndarray, counts: list[int], method: str) -> np.ndarray:
    """For each configuration, each client's scale divided out, the mean silhouette of the exactly-c cut
    of its own tree, for each c.

    The scales are divided out of every configuration, observed or rotated, by the same function, so that
    the statistic is one fixed function of the configuration and rotating its input gives its exact null.

    Args:
        configurations: (draws, clients, dims).
        counts: cluster counts, each in [2, clients - 1].
        method: scipy linkage method.
    Returns:
        (draws, len(counts)) float64.
    """
    draws, n, _ = configurations.shape
    matrices = np.empty((draws, n, n))
    labels = np.empty((len(counts), draws, n), dtype=np.int64)
    for i, points in enumerate(configurations):
        scale_free = classical_mds(divide_out_scales(squareform(pdist(points, "sqeuclidean"))))
        condensed = pdist(scale_free)
        matrices[i] = squareform(condensed)
        tree = linkage(condensed, method=method)
        for j, c in enumerate(counts):
            labels[j, i] = _cut_many(tree, n, c)
    return np.stack([batch_mean_silhouette(matrices, labels[j]) for j in range(len(counts))], axis=1)


@dataclass
class StageTests:
    """The relabelling tests of one stage: layers ``start..L-1`` against one previous partition.

    Attributes:
        statistics: layer -> candidate -> mean silhouette of the held-out tree's cut under the layer.
        quantiles: layer -> candidate -> critical value (its null quantile at the layer's level).
        grouped: whether the clients' structure over the stage's layers is grouped (some candidate's cut
            of it beats its rotation null): groups, not a continuum. Without it nothing is admissible.
        admissible: layer -> candidates that pass at this layer and at every deeper layer, when grouped.
    """

    statistics: dict[int, dict[int, float]] = field(default_factory=dict)
    quantiles: dict[int, dict[int, float]] = field(default_factory=dict)
    grouped: bool = False
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
            tested_cuts = {c: self.held_out_cut(layer, c) for c in counts}
            rotated = None
            if min(distinct_partitions(tested_cuts[c][perm]) for c in counts) < _min_distinct(self.level):
                # Too few distinct relabellings for the level: rotate the layer's configuration instead.
                rotated = rotated_distances(
                    self.distances[layer], parent, self.permutations, (self.seed, start, p, layer)
                )
            stats, mean, sd, z = {}, {}, {}, {}
            for c in counts:
                tested = tested_cuts[c]
                if rotated is None:
                    both = np.vstack([tested[None], tested[perm]])  # row 0: observed; then the relabellings
                    values = batch_mean_silhouette(self.distances[layer], both)
                else:  # row 0: the unrotated configuration; one fixed partition scored on every rotation
                    values = batch_mean_silhouette(rotated, np.broadcast_to(tested, (len(rotated), n_clients)))
                stats[c], mean[c], sd[c] = float(values[0]), float(values[1:].mean()), float(values[1:].std())
                z[c] = (values - mean[c]) / (sd[c] if sd[c] > 0 else 1.0)  # standardised by its own null
            t = float(np.sort(np.max([z[c][1:] for c in counts], axis=0))[k - 1])
            # Decide in standardised units, where a relabelling equal to the observed partition ties
            # exactly (and so does not count as beating its null).
            passes[layer] = {c for c in counts if z[c][0] > t}
            tests.statistics[layer] = stats
            tests.quantiles[layer] = {c: _critical(stats[c], mean[c] + t * sd[c], c in passes[layer]) for c in counts}
        tests.grouped = self.grouped(parent, start, counts)
        supported = set(counts) if tests.grouped else set()
        for layer in range(n_layers - 1, start - 1, -1):  # deepest first: a split must hold below it
            supported &= passes[layer]
            tests.admissible[layer] = sorted(supported)
        return tests

    def grouped(self, parent: np.ndarray, start: int, counts: list[int]) -> bool:
        """Whether the clients' structure over layers ``start..L-1`` is grouped within ``parent``'s
        clusters: some candidate's cut of it beats the ``level`` quantile of the largest standardised
        silhouette over random rotations of the clients within those clusters (max-T over ``counts``).

        Args:
            parent: (clients,) the previous partition.
            start: first layer of the stage.
            counts: candidate cluster counts, each in [2, clients - 1].
        """
        n_layers = self.num_layers
        parent = np.asarray(parent, dtype=np.int64)
        p = int(len(np.unique(parent)))
        rng = np.random.default_rng((self.seed, start, p, n_layers))  # layer index n_layers: its own stream
        observed = pooled_configuration(self.distances[start:])
        rotated = rotate_within(observed, parent, self.permutations, rng)
        values = grouping_silhouettes(np.concatenate([observed[None], rotated]), counts, self.linkage_method)
        mean, sd = values[1:].mean(axis=0), values[1:].std(axis=0)
        z = (values - mean) / np.where(sd > 0, sd, 1.0)
        t = float(np.sort(z[1:].max(axis=1))[_quantile_rank(self.level, self.permutations) - 1])
        return bool(z[0].max() > t)
