"""Federations with planted structure (``data.groups``): groups of clients, each drawn from its own
source with its own label map, label skew and sizes, combined into one classification dataset.

Groups that read the same source share its pools: each group draws from the examples earlier groups
left, so no example goes to two clients. The combined dataset holds only the examples the clients
use, labelled with each group's mapped label names in the federation's label space (the sorted union
of the groups' label names), so everything downstream sees an ordinary partition.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedtreelora.data.partition import ClientData, LabelDrift, dirichlet_partition
from fedtreelora.data.sources import load_classification
from fedtreelora.data.types import ClassificationDataset, LabeledTexts
from fedtreelora.errors import ConfigError

if TYPE_CHECKING:
    from fedtreelora.config import DataConfig


@dataclass(frozen=True)
class SourceSpec:
    """What a group reads; groups with equal specs draw from one loaded source and share its pools."""

    dataset: str
    hub_config: str | None
    text_column: str
    text_pair_column: str | None
    label_column: str


@dataclass(frozen=True)
class DriftSpec:
    """A group's ``drift``: new label names from a known round on."""

    round: int
    """The first round (1-based, as configured) with the new labels."""
    label_map: Mapping[str, str | None]
    """Source label name -> its name from ``round`` on; labels not listed keep the group's label map's name."""
    name: str
    """The group's name from ``round`` on (its own name when ``drift.name`` is unset)."""


@dataclass(frozen=True, eq=False)
class GroupSpec:
    """One entry of ``data.groups`` with every unset option taken from the data section."""

    index: int
    """Position in ``data.groups`` (seeds the group's draws; error messages name it)."""
    name: str
    clients: int
    source: SourceSpec
    label_map: Mapping[str, str | None] | None
    n_train: int
    n_val: int
    alpha: float
    drift: DriftSpec | None = None

    @property
    def field(self) -> str:
        """The option path of this group, e.g. ``data.groups[2]``."""
        return f"data.groups[{self.index}]"


def group_specs(data: DataConfig) -> list[GroupSpec]:
    """``data.groups`` resolved against the data section's options (empty when unset)."""
    specs = []
    for i, g in enumerate(data.groups or ()):
        source = SourceSpec(
            dataset=g.dataset if g.dataset is not None else data.dataset,
            hub_config=g.hub_config if g.hub_config is not None else data.hub_config,
            text_column=g.text_column if g.text_column is not None else data.text_column,
            text_pair_column=g.text_pair_column if g.text_pair_column is not None else data.text_pair_column,
            label_column=g.label_column if g.label_column is not None else data.label_column,
        )
        specs.append(
            GroupSpec(
                index=i,
                name=g.name,
                clients=g.clients,
                source=source,
                label_map=None if g.label_map is None else dict(g.label_map),
                n_train=g.n_train if g.n_train is not None else data.n_train,
                n_val=g.n_val if g.n_val is not None else data.n_val,
                alpha=g.dirichlet_alpha if g.dirichlet_alpha is not None else data.dirichlet_alpha,
                drift=None
                if g.drift is None
                else DriftSpec(g.drift.round, dict(g.drift.label_map), g.drift.name or g.name),
            )
        )
    return specs


def planted_groups(data: DataConfig, rnd: int = 0) -> list[str] | None:
    """Each client's group name in round ``rnd`` (0-based; default the first), clients numbered group
    by group in ``data.groups`` order; None when the federation has no groups. The clients of a group
    whose ``drift`` has begun by ``rnd`` carry its ``drift.name``. Read from the configuration alone (no
    data is loaded)."""
    if data.groups is None:
        return None
    names: list[str] = []
    for g in data.groups:
        name = g.name
        if g.drift is not None and g.drift.name is not None and rnd >= g.drift.round - 1:
            name = g.drift.name
        names += [name] * g.clients
    return names


def drift_field(data: DataConfig) -> str | None:
    """The option path of the first group that drifts (``data.groups[i].drift``), for error messages;
    None when no group's labels change during the run."""
    for i, g in enumerate(data.groups or ()):
        if g.drift is not None:
            return f"data.groups[{i}].drift"
    return None


def configured_dataset_name(data: DataConfig) -> str:
    """The dataset's name as the configuration gives it: ``data.dataset``, or with groups their distinct
    sources joined with ``+`` (for a server that never loads the data)."""
    if data.groups is None:
        return str(data.dataset)
    return "+".join(dict.fromkeys(s.source.dataset for s in group_specs(data)))


def group_seed(seed: int, index: int) -> int:
    """The seed of group ``index``'s draws, from the run's seed."""
    return int(np.random.SeedSequence([seed, index, 0x47524F55]).generate_state(1)[0])


def load_group_sources(
    specs: Sequence[GroupSpec], *, train_split: str = "train", validation_split: str | None = None
) -> dict[SourceSpec, ClassificationDataset]:
    """Load every distinct source of ``specs`` once (``load_classification`` with the group's columns)."""
    sources: dict[SourceSpec, ClassificationDataset] = {}
    for spec in specs:
        s = spec.source
        if s not in sources:
            sources[s] = load_classification(
                s.dataset,
                text_column=s.text_column,
                text_pair_column=s.text_pair_column,
                label_column=s.label_column,
                hub_config=s.hub_config,
                train_split=train_split,
                validation_split=validation_split,
            )
    return sources


def group_labels(spec: GroupSpec, source_names: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """A group's label names after its label map, and where each source label goes.

    Returns:
        (the group's label names, sorted; (source labels,) int64 id of each source label among those
        names, -1 for a label the map drops).

    Raises:
        ConfigError: the map names a label the source does not have, or drops every label.
    """
    mapping = dict(spec.label_map or {})
    unknown = sorted(set(mapping) - set(source_names))
    if unknown:
        raise ConfigError(
            f"{spec.field}.label_map ({spec.name}) names {unknown}, which {spec.source.dataset!r} does not have; "
            f"its labels are {list(source_names)}"
        )
    targets = [mapping.get(name, name) for name in source_names]
    names = sorted({t for t in targets if t is not None})
    if not names:
        raise ConfigError(f"{spec.field}.label_map ({spec.name}) maps every label to null; keep at least one")
    position = {name: i for i, name in enumerate(names)}
    return names, np.asarray([-1 if t is None else position[t] for t in targets], dtype=np.int64)


def drift_labels(spec: GroupSpec, source_names: Sequence[str], label_names: Sequence[str]) -> np.ndarray:
    """Where each source label goes from a group's drift round on, in the federation's label space.

    Args:
        spec: a group with ``drift`` set.
        source_names: the labels of the group's source.
        label_names: the federation's labels (the sorted union of the groups' names before any drift).

    Returns:
        (source labels,) int64 federation label id of each source label from the drift round on, -1
        for a label the group drops (``label_map`` to null).

    Raises:
        ConfigError: the drift's map names a label the source does not have, maps a label the group
            keeps to null, gives a name to a label the group drops, or a name outside ``label_names``.
    """
    assert spec.drift is not None
    where = f"{spec.field}.drift.label_map ({spec.name})"
    before = dict(spec.label_map or {})
    after = dict(spec.drift.label_map)
    unknown = sorted(set(after) - set(source_names))
    if unknown:
        raise ConfigError(
            f"{where} names {unknown}, which {spec.source.dataset!r} does not have; its labels are "
            f"{list(source_names)}: remove them or use those names"
        )
    position = {name: i for i, name in enumerate(label_names)}
    out = np.full(len(source_names), -1, dtype=np.int64)
    for i, source in enumerate(source_names):
        old = before.get(source, source)
        new = after.get(source, old)
        if old is None and new is not None:
            raise ConfigError(
                f"{where} maps {source!r} to {new!r}, but {spec.field}.label_map drops {source!r} (maps it to "
                f"null), so the group holds no example of it; leave {source!r} out of the drift's label_map"
            )
        if old is not None and new is None:
            raise ConfigError(
                f"{where} maps {source!r} to null, but the group's clients hold examples of it: a drift "
                f"relabels the same examples and cannot drop them; map {source!r} to one of {list(label_names)}"
            )
        if new is None:
            continue
        if new not in position:
            raise ConfigError(
                f"{where} maps {source!r} to {new!r}, which is not a label of the federation "
                f"{list(label_names)} (the classification head is built before the drift); use one of those"
            )
        out[i] = position[new]
    return out


def _check_pairs(specs: Sequence[GroupSpec], sources: Mapping[SourceSpec, ClassificationDataset]) -> None:
    paired = [sources[s.source].train.text_pairs is not None for s in specs]
    for spec, pair in zip(specs, paired, strict=True):
        if pair != paired[0]:
            first = specs[0]
            kind = {True: "sentence pairs", False: "single sentences"}
            raise ConfigError(
                f"{spec.field} ({spec.name}) reads {kind[pair]} from {spec.source.dataset!r} but "
                f"{first.field} ({first.name}) reads {kind[paired[0]]} from {first.source.dataset!r}; all groups "
                "must be the same kind of task: change data.groups[].dataset (or text_pair_column)"
            )


def _check_shared_labels(specs: Sequence[GroupSpec], names: Sequence[list[str]]) -> None:
    if all(n == names[0] for n in names):
        return
    sets = "; ".join(f"{s.name}: {n}" for s, n in zip(specs, names, strict=True))
    raise ConfigError(
        f"the groups' label sets differ ({sets}) but model.head=frozen gives every client one shared random "
        "head over the same labels: set model.head=local (each client trains and keeps its own head), or give "
        "data.groups[].label_map entries that map every group onto the same label names"
    )


@dataclass
class _Combined:
    """The examples the clients use, appended group by group: one growing train or validation pool."""

    texts: list[str]
    pairs: list[str] | None
    labels: list[np.ndarray]

    def append(self, pool: LabeledTexts, indices: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Append ``pool``'s examples at ``indices`` ((k,) int) with ``labels`` ((k,) global ids);
        returns their (k,) indices in the combined pool."""
        start = len(self.texts)
        self.texts.extend(pool.texts[int(i)] for i in indices)
        if self.pairs is not None and pool.text_pairs is not None:
            self.pairs.extend(pool.text_pairs[int(i)] for i in indices)
        self.labels.append(labels.astype(np.int64))
        return np.arange(start, len(self.texts), dtype=np.int64)

    def pool(self, label_names: list[str]) -> LabeledTexts:
        labels = np.concatenate(self.labels) if self.labels else np.empty(0, dtype=np.int64)
        return LabeledTexts(self.texts, self.pairs, labels, label_names)


def _available(used: np.ndarray, labels: np.ndarray, to_group: np.ndarray) -> np.ndarray:
    """(k,) indices of a source pool not yet used whose label the group keeps."""
    return np.flatnonzero(~used & (to_group[labels] >= 0))


def _check_size(spec: GroupSpec, have: int, per_client: int, option: str, shared: bool) -> None:
    need = spec.clients * per_client
    if need > have:
        left = " left after earlier groups of the same source took theirs" if shared else ""
        raise ConfigError(
            f"{spec.field} ({spec.name}) needs {spec.clients} clients x {option}={per_client} = {need} "
            f"{'training' if option == 'n_train' else 'validation'} examples but {spec.source.dataset!r} has "
            f"{have}{left} (after the group's label map); lower {spec.field}.{option} or {spec.field}.clients"
        )


def partition_groups(
    specs: Sequence[GroupSpec],
    sources: Mapping[SourceSpec, ClassificationDataset],
    *,
    seed: int,
    frozen_head: bool,
) -> tuple[ClassificationDataset, list[ClientData]]:
    """One dataset and every client's share, group by group.

    Each group's clients come from :func:`~fedtreelora.data.partition.dirichlet_partition` over the
    still-unused examples of its source (those of classes its label map keeps), with the group's sizes,
    ``alpha`` and seed (:func:`group_seed`); the drawn examples are appended to the combined pools with
    the group's mapped labels. Client k of the result is the k-th client counting group by group. A
    group with ``drift`` gives each of its clients a :class:`~fedtreelora.data.partition.LabelDrift`:
    the same examples' labels under the drift's map (:func:`drift_labels`); the draws do not depend on it.

    Args:
        specs: the groups, in ``data.groups`` order.
        sources: every source of ``specs``, loaded (:func:`load_group_sources`).
        seed: the run's seed.
        frozen_head: the clients share one frozen head (``model.head=frozen``), so the groups must use
            the same label names.

    Returns:
        (dataset named by its sources joined with ``+``, label names the sorted union of the groups';
        clients whose ``proportions`` and label counts have shape (federation labels,)).

    Raises:
        ConfigError: sentence pairs mixed with single sentences, a label map naming unknown labels,
            label sets that differ under a frozen head, a source too small for its groups, or a drift
            map that does not fit (:func:`drift_labels`).
    """
    if not specs:
        raise ValueError("partition_groups needs at least one group")
    _check_pairs(specs, sources)
    resolved = [group_labels(s, sources[s.source].label_names) for s in specs]
    if frozen_head:
        _check_shared_labels(specs, [names for names, _ in resolved])
    label_names = sorted({name for names, _ in resolved for name in names})
    position = {name: i for i, name in enumerate(label_names)}
    paired = sources[specs[0].source].train.text_pairs is not None
    train = _Combined([], [] if paired else None, [])
    val = _Combined([], [] if paired else None, [])
    used = {
        key: (np.zeros(len(ds.train), dtype=bool), np.zeros(len(ds.validation), dtype=bool))
        for key, ds in sources.items()
    }
    clients: list[ClientData] = []
    for spec, (names, to_group) in zip(specs, resolved, strict=True):
        source = sources[spec.source]
        drifted = None if spec.drift is None else drift_labels(spec, source.label_names, label_names)
        train_used, val_used = used[spec.source]
        shared = bool(train_used.any())
        train_idx = _available(train_used, source.train.labels, to_group)
        val_idx = _available(val_used, source.validation.labels, to_group)
        _check_size(spec, train_idx.size, spec.n_train, "n_train", shared)
        _check_size(spec, val_idx.size, spec.n_val, "n_val", shared)
        to_global = np.asarray([position[n] for n in names], dtype=np.int64)
        drawn = dirichlet_partition(
            to_group[source.train.labels[train_idx]],
            to_group[source.validation.labels[val_idx]],
            num_clients=spec.clients,
            n_train=spec.n_train,
            n_val=spec.n_val,
            alpha=spec.alpha,
            seed=group_seed(seed, spec.index),
            num_labels=len(names),
        )
        for c in drawn:
            src_train, src_val = train_idx[c.train_indices], val_idx[c.val_indices]
            train_used[src_train] = True
            val_used[src_val] = True
            proportions = np.zeros(len(label_names))
            train_counts = np.zeros(len(label_names), dtype=np.int64)
            val_counts = np.zeros(len(label_names), dtype=np.int64)
            proportions[to_global] = c.proportions
            train_counts[to_global] = c.train_label_counts
            val_counts[to_global] = c.val_label_counts
            clients.append(
                ClientData(
                    client=len(clients),
                    train_indices=train.append(
                        source.train, src_train, to_global[to_group[source.train.labels[src_train]]]
                    ),
                    val_indices=val.append(
                        source.validation, src_val, to_global[to_group[source.validation.labels[src_val]]]
                    ),
                    proportions=proportions,
                    train_label_counts=train_counts,
                    val_label_counts=val_counts,
                    drift=None
                    if drifted is None or spec.drift is None
                    else LabelDrift(
                        round=spec.drift.round - 1,
                        train_labels=drifted[source.train.labels[src_train]],
                        val_labels=drifted[source.validation.labels[src_val]],
                    ),
                )
            )
    name = "+".join(dict.fromkeys(sources[s.source].name for s in specs))
    return ClassificationDataset(name, train.pool(label_names), val.pool(label_names)), clients
