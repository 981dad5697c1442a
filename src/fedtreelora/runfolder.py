"""The layout of a run folder: the one place that knows its file names and formats.

A run folder (what ``fedtreelora run --out DIR`` writes) holds::

    config.yaml                      the resolved experiment config (every key, defaults included)
    partition.json                   which examples each client holds (label counts, planted groups)
    metrics.jsonl                    one JSON object per line: a client's record of one round, of its local
                                     training and the model it receives; a client whose training did not
                                     count that round (not sampled, update rejected) has a record of the
                                     received model's scores only, marked ``"trained": false``
                                     (:func:`trained_record`)
    summary.json                     headline numbers, history and sharing plan; written last, so a
                                     readable one means the run finished
    clients/client_NNN.safetensors   client NNN's final trained adapter state (NNN: its index, 3 digits): the
                                     model scored after its last local training (``accuracy``)
    clients/received/client_NNN.safetensors
                                     client NNN's final received model: that state with the shared part
                                     replaced by what the server sent it after its last round, the
                                     model scored as ``received_accuracy`` (absent in runs written
                                     before it was kept)
    clients/meta.json                what rebuilds the model around those states (backbone, sites, and
                                     the phase each model was scored in)
    checkpoints/                     the latest resumable checkpoint (see :mod:`fedtreelora.engines.checkpoint`)
    tensorboard/                     TensorBoard event files (``logging.tensorboard``)
    nodes.json                       a Flower run's node of each client
    report.html, report.md           ``fedtreelora report``, with report.md's figures in report_files/

Everything else reads and writes these through :class:`RunFolder`. JSON files are written atomically
(temporary file, then rename), so a crash never leaves half a file.

What is read comes back typed: :class:`RunSummary` (``summary.json``, its headline numbers under each
convention as :class:`Headline`, its privacy as :class:`PrivacyRecord`), :class:`RoundRecord` (one round
of its history), :class:`ClientRecord` (one line of ``metrics.jsonl``) and :class:`Convention`
(``received`` or ``trained``: what a score is of, how outputs say it, the other one, and the default of
runs written before the setting). Each keeps every key as written and reads the keys runs written before
it lack with the defaults of their time, here and nowhere else; what such a summary lacks that can be
computed from its history (the best federated round) is filled in by
:meth:`RunFolder.read_complete_summary`, the one reader of the report and ``compare``. A comparison
folder (``fedtreelora compare --out DIR``) is a :class:`ComparisonFolder`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import yaml

from fedtreelora.config import ExperimentConfig, dump_config, load_config

if TYPE_CHECKING:  # torch only for annotations: reading a run's numbers must not need it
    import torch

    from fedtreelora.core.findings import LabelPrior


ClientModel = Literal["received", "trained"]
"""Which of a client's final models: ``trained`` (its state after its last local training) or
``received`` (that state with what the server sent it after its last round in place of the shared
part, as ``federation.evaluate: received`` scores it)."""

CLIENT_MODELS: tuple[ClientModel, ...] = ("received", "trained")
"""Every :data:`ClientModel`, the default (what ``fedtreelora export`` writes) first."""


def trained_record(record: Mapping[str, Any]) -> bool:
    """True for a ``metrics.jsonl`` record of a client whose local training counted that round (its
    training scores, upload and received scores); False for a record that only scores the model a
    client that sat the round out would receive (``"trained": false``; runs written before such records
    existed have none)."""
    return record.get("trained", True) is not False


class Convention(str, Enum):
    """A scoring convention (``federation.evaluate``): which of a client's models a round's scores are of.

    The one place that knows the two conventions: their names, how outputs describe them, the other one,
    the keys they are recorded under (round records, per-client records, ``by_convention``) and which
    one a run written before the setting existed used (:meth:`of`).
    """

    RECEIVED = "received"
    """The model each client receives after aggregation: its kept state with the server's payload in
    place of the shared part (the papers' convention, the default)."""
    TRAINED = "trained"
    """Each client's model right after its local training, before aggregation."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def of(cls, value: object) -> Convention:
        """The convention named ``value``; :attr:`TRAINED` for None (a run written before
        ``federation.evaluate`` existed scored after local training)."""
        return cls.TRAINED if value is None else cls(str(value))

    @property
    def other(self) -> Convention:
        """The other convention (the one the run did not take as its headline)."""
        return Convention.TRAINED if self is Convention.RECEIVED else Convention.RECEIVED

    @property
    def description(self) -> str:
        """One line saying what is scored, as table titles say it."""
        return _CONVENTION_TEXT[self][0]

    @property
    def scored(self) -> str:
        """What is scored, after a score's name (``final mean accuracy of the model each client receives``)."""
        return _CONVENTION_TEXT[self][1]

    @property
    def subject(self) -> str:
        """What is scored, as a noun phrase (``the model each client receives``)."""
        return _CONVENTION_TEXT[self][2]

    @property
    def mean_label(self) -> str:
        """How a plot legend names the round mean under this convention."""
        return _CONVENTION_TEXT[self][3]

    @property
    def mean_key(self) -> str:
        """The round record's key of the round mean under this convention (``received_mean_metric``)."""
        return f"{self.value}_mean_metric"

    def score_key(self, metric: str) -> str:
        """The per-client record's key of a client's score under this convention: ``received_<metric>``
        or ``<metric>``."""
        return f"received_{metric}" if self is Convention.RECEIVED else metric


_CONVENTION_TEXT: dict[Convention, tuple[str, str, str, str]] = {
    Convention.RECEIVED: (
        "scored on the model each client receives after aggregation (the papers' convention)",
        "of the model each client receives",
        "the model each client receives",
        "mean of the received model",
    ),
    Convention.TRAINED: (
        "scored right after each client's local training, before aggregation",
        "after local training",
        "each client after local training",
        "mean after local training",
    ),
}
"""Per convention: (:attr:`~Convention.description`, :attr:`~Convention.scored`,
:attr:`~Convention.subject`, :attr:`~Convention.mean_label`)."""


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


class _Record(Mapping[str, Any]):
    """A read-only record as written (every key kept, including ones added after this reader), with typed
    properties for the keys this package reads. Equal to its mapping; :meth:`to_dict` gives it back."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data: Mapping[str, Any] = data._data if isinstance(data, _Record) else data

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self._data)!r})"

    def to_dict(self) -> dict[str, Any]:
        """The record as a plain dict, keys in the order written."""
        return dict(self._data)


class ClientRecord(_Record):
    """One line of ``metrics.jsonl``: one client's record of one round.

    A client whose training counted that round has its training scores (``train_loss``, ``steps``,
    ``<metric>``, ``eval_loss``, ``num_train``, ``num_val``, ``uplink_bytes``, ``downlink_bytes``) and
    the scores of the model it then received (``received_<metric>``, ``received_eval_loss``); one that
    sat the round out has only the received scores, marked ``"trained": false``.
    """

    __slots__ = ()

    @property
    def round(self) -> int:
        """The round (0-based)."""
        return int(self["round"])

    @property
    def client(self) -> int:
        """The client's index."""
        return int(self["client"])

    @property
    def phase(self) -> str | None:
        """The round's phase name (``warmup``, ...); None in records written before it was recorded."""
        phase = self.get("phase")
        return None if phase is None else str(phase)

    @property
    def trained(self) -> bool:
        """Whether the client's training counted this round (:func:`trained_record`)."""
        return trained_record(self)

    @property
    def train_loss(self) -> float | None:
        """The mean training loss of the client's local training; None in a score-only record."""
        return _float(self.get("train_loss"))

    def score(self, metric: str, convention: Convention | str) -> float | None:
        """The client's ``metric`` under ``convention`` (or its name); None where it was not scored."""
        return _float(self.get(Convention(convention).score_key(metric)))


class RoundRecord(_Record):
    """One round of a run's history (``summary.json``'s ``history``): the round's means over clients.

    Keys: ``round``, ``phase``, ``clients`` (whose training counted), ``rejected``, ``metric``,
    ``evaluate``, ``mean_metric`` (under the run's headline convention; ``mean_accuracy`` in runs written
    before it), ``received_mean_metric`` and ``trained_mean_metric``, ``mean_train_loss``,
    ``uplink_mb_per_client``, ``downlink_mb_per_client`` and, for some methods, ``server``.
    """

    __slots__ = ()

    @property
    def round(self) -> int:
        """The round (0-based)."""
        return int(self["round"])

    @property
    def phase(self) -> str | None:
        """The round's phase name; None in histories written before it was recorded."""
        phase = self.get("phase")
        return None if phase is None else str(phase)

    @property
    def clients(self) -> list[int]:
        """The clients whose training counted this round ([] when unrecorded)."""
        return [int(k) for k in self.get("clients") or []]

    @property
    def rejected(self) -> list[int]:
        """The clients whose update the server rejected this round ([] when none, or unrecorded)."""
        return [int(k) for k in self.get("rejected") or []]

    @property
    def server(self) -> dict[str, Any]:
        """What the method's server recorded this round (``cuts`` where it made its clusters, ...); {}
        when nothing."""
        return dict(self.get("server") or {})

    @property
    def mean(self) -> float | None:
        """The round's mean client metric under the run's headline convention (``mean_metric``; records
        written before it existed hold ``mean_accuracy``)."""
        return _float(self.get("mean_metric", self.get("mean_accuracy")))

    def convention_mean(self, convention: Convention | str) -> float | None:
        """The round's mean client metric under ``convention`` (or its name); None where it was not
        recorded."""
        return _float(self.get(Convention(convention).mean_key))

    @property
    def mean_train_loss(self) -> float | None:
        """The mean training loss of the clients that trained."""
        return _float(self.get("mean_train_loss"))

    @property
    def epsilon(self) -> float | None:
        """With ``privacy`` on, the run's epsilon after this round (None when off, or unbounded)."""
        return _float(self.get("epsilon"))

    @property
    def epsilon_server(self) -> float | None:
        """With ``privacy`` on, the epsilon against the server after this round: the largest over clients
        (None when off, or unbounded)."""
        return _float(self.get("epsilon_server"))

    @property
    def has_privacy(self) -> bool:
        """Whether the run had ``privacy`` on (the record carries ``epsilon``, None while unbounded)."""
        return "epsilon" in self

    @property
    def uplink_mb(self) -> float:
        """Megabytes each participating client sent, on average (0.0 when unrecorded)."""
        return float(self.get("uplink_mb_per_client") or 0.0)

    @property
    def downlink_mb(self) -> float:
        """Megabytes each participating client received, on average (0.0 when unrecorded)."""
        return float(self.get("downlink_mb_per_client") or 0.0)


class PrivacyRecord(_Record):
    """A run's ``privacy`` record (``summary.json``, with ``privacy`` on; see docs/privacy.md): the
    resolved settings of client-level differential privacy (each client's update clipped to
    ``clip_norm``, Gaussian noise of std ``noise_multiplier * clip_norm`` added before it leaves the
    client) and the privacy spent by the end of the run.

    Keys: ``clip_norm``, ``noise_multiplier`` (derived when a target was given), ``target_epsilon``,
    ``delta``, ``accountant``, ``adjacency``, ``sample_rate``, ``planned_rounds``, ``upload_rounds``,
    ``epsilon``, ``epsilon_server`` and ``per_client_epsilon_server``. An epsilon is None where it is
    unbounded (``noise_multiplier: 0``, clipping alone).
    """

    __slots__ = ()

    @property
    def clip_norm(self) -> float | None:
        """S: the L2 bound of one client's update (all uploaded tensors together)."""
        return _float(self.get("clip_norm"))

    @property
    def noise_multiplier(self) -> float | None:
        """z: the noise std on every coordinate is z * S (derived from the target epsilon when one was
        given)."""
        return _float(self.get("noise_multiplier"))

    @property
    def target_epsilon(self) -> float | None:
        """The epsilon z was derived to reach after the planned rounds; None when z was given."""
        return _float(self.get("target_epsilon"))

    @property
    def delta(self) -> float | None:
        """The delta of the (epsilon, delta) guarantee."""
        return _float(self.get("delta"))

    @property
    def accountant(self) -> str | None:
        """The accountant (``rdp``, ``prv``)."""
        return None if self.get("accountant") is None else str(self["accountant"])

    @property
    def adjacency(self) -> str | None:
        """``add_remove`` (sensitivity S) or ``replace`` (sensitivity 2S)."""
        return None if self.get("adjacency") is None else str(self["adjacency"])

    @property
    def sample_rate(self) -> float | None:
        """The share of clients sampled per round (the accountant's q)."""
        return _float(self.get("sample_rate"))

    @property
    def planned_rounds(self) -> int | None:
        """The rounds the run was configured for (what a target epsilon is reached after)."""
        return _int(self.get("planned_rounds"))

    @property
    def upload_rounds(self) -> int | None:
        """The rounds with any upload (the releases counted)."""
        return _int(self.get("upload_rounds"))

    @property
    def epsilon(self) -> float | None:
        """The final epsilon at :attr:`delta` against the other clients (amplified by sampling); None when
        unbounded."""
        return _float(self.get("epsilon"))

    @property
    def epsilon_server(self) -> float | None:
        """The final epsilon against the server (every round a client uploaded in a full release): the
        largest over clients; None when unbounded."""
        return _float(self.get("epsilon_server"))

    @property
    def per_client_epsilon_server(self) -> list[float | None]:
        """Each client's epsilon against the server ([] when not recorded)."""
        return [_float(v) for v in self.get("per_client_epsilon_server") or []]


@dataclass(frozen=True)
class Headline:
    """A run's headline numbers under one convention: the final round's mean, the best round's (as the
    papers report it, possibly a warm-up round) and the best federated round's (the best after warm-up).
    None where the run has none (a best federated round of a run that ended in warm-up, or of a summary
    written before it was recorded and not completed: :func:`fedtreelora.headline.complete_summary`)."""

    final_mean: float | None
    best_mean: float | None
    best_round: int | None
    best_federated_mean: float | None
    best_federated_round: int | None

    KEYS: ClassVar[tuple[str, ...]] = (
        "final_mean", "best_mean", "best_round", "best_federated_mean", "best_federated_round"
    )  # fmt: skip
    """Their keys, top level in the summary (the headline convention) and in each ``by_convention`` entry."""

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Headline:
        """From a summary (its top level) or one of its ``by_convention`` entries."""
        return cls(
            final_mean=_float(values.get("final_mean")),
            best_mean=_float(values.get("best_mean")),
            best_round=_int(values.get("best_round")),
            best_federated_mean=_float(values.get("best_federated_mean")),
            best_federated_round=_int(values.get("best_federated_round")),
        )

    def to_dict(self) -> dict[str, Any]:
        """The numbers by their keys (:attr:`KEYS`, in that order), as a summary records them."""
        return {key: getattr(self, key) for key in self.KEYS}

    def score(self, key: str) -> float | None:
        """One of the means by its key (``final_mean``, ``best_mean``, ``best_federated_mean``)."""
        if key not in ("final_mean", "best_mean", "best_federated_mean"):
            raise KeyError(key)
        value: float | None = getattr(self, key)
        return value


class RunSummary(_Record):
    """A run's ``summary.json``, read: headline numbers, history and sharing plan.

    Every key as written is kept (a mapping, for what reads it whole); the properties are what this
    package reads, with the defaults of runs written before a key existed."""

    __slots__ = ()

    @property
    def method(self) -> str | None:
        """The method's name."""
        return None if self.get("method") is None else str(self["method"])

    @property
    def dataset(self) -> str | None:
        """The dataset's name."""
        return None if self.get("dataset") is None else str(self["dataset"])

    @property
    def metric(self) -> str:
        """The per-client metric: ``accuracy`` (classification, and runs written before it was
        recorded) or ``rouge1`` (generation)."""
        return str(self.get("metric", "accuracy"))

    @property
    def evaluate(self) -> Convention:
        """The headline convention (``federation.evaluate``; :meth:`Convention.of` for old runs)."""
        return Convention.of(self.get("evaluate"))

    @property
    def score_key(self) -> str:
        """The per-client record key of the headline score (``received_accuracy``, ``accuracy``)."""
        return self.evaluate.score_key(self.metric)

    @property
    def headline(self) -> Headline:
        """The headline numbers under :attr:`evaluate` (the summary's top level)."""
        return Headline.from_mapping(self)

    def by_convention(self, convention: Convention | str) -> Headline | None:
        """The headline numbers under ``convention`` (or its name); None for a run written before both
        were recorded."""
        values = (self.get("by_convention") or {}).get(Convention(convention).value)
        return None if not values else Headline.from_mapping(values)

    @property
    def headlines(self) -> dict[Convention, Headline] | None:
        """The headline numbers under each convention the summary records in ``by_convention``, in the
        order written; None for a run written before they were recorded."""
        entries = self.get("by_convention")
        if not isinstance(entries, Mapping):
            return None
        return {Convention(name): Headline.from_mapping(values) for name, values in entries.items()}

    @property
    def has_headline(self) -> bool:
        """Whether the summary records the headline numbers (a finished run's does)."""
        return "best_mean" in self

    @property
    def has_best_federated(self) -> bool:
        """Whether the summary records the best federated round (runs written before it do not:
        :func:`fedtreelora.headline.complete_summary` computes it)."""
        return "best_federated_mean" in self

    @property
    def is_complete(self) -> bool:
        """Whether the summary records every number this version writes from the round history: the
        best federated round (:data:`Headline.KEYS`) at the top level and under each convention, and
        each client's score at it (runs written before it was recorded lack them)."""
        entries = self.get("by_convention")
        return (
            all(key in self for key in Headline.KEYS)
            and "per_client_best_federated_round" in self
            and (not isinstance(entries, Mapping) or all(all(k in e for k in Headline.KEYS) for e in entries.values()))
        )

    @property
    def final_mean(self) -> float | None:
        """The final round's mean under the headline convention."""
        return self.headline.final_mean

    @property
    def best_mean(self) -> float | None:
        """The best round's mean under the headline convention."""
        return self.headline.best_mean

    @property
    def best_round(self) -> int | None:
        """The best round (0-based)."""
        return self.headline.best_round

    @property
    def best_federated_mean(self) -> float | None:
        """The best federated round's mean (the best after warm-up); None when there is none."""
        return self.headline.best_federated_mean

    @property
    def best_federated_round(self) -> int | None:
        """The best federated round (0-based); None when there is none."""
        return self.headline.best_federated_round

    @property
    def history(self) -> list[RoundRecord]:
        """Every round's record, in order ([] when none)."""
        return [RoundRecord(h) for h in self.get("history") or []]

    @property
    def num_clients(self) -> int:
        """How many clients (from ``per_client`` in runs that did not record it)."""
        return int(self.get("num_clients") or len(self.get("per_client") or []))

    @property
    def num_rounds(self) -> int:
        """How many rounds ran (the history's length)."""
        return len(self.get("history") or [])

    @property
    def warmup_rounds(self) -> list[int]:
        """The 0-based rounds whose phase was ``warmup``."""
        return [h.round for h in self.history if h.phase == "warmup"]

    def per_client_at(self, key: str) -> list[float | None]:
        """Each client's score at the round of one headline score (``final_mean``: its last score,
        ``best_mean``: at the best round, ``best_federated_mean``: at the best federated round); []
        when not recorded."""
        return [_float(v) for v in self.get(PER_CLIENT_KEYS[key]) or []]

    @property
    def client_categories(self) -> list[str]:
        """Each client's category (datasets that have them, e.g. the NLG tasks), [] otherwise."""
        return [str(c) for c in self.get("client_categories") or []]

    @property
    def cuts(self) -> list[int] | None:
        """Per layer, how many clusters share it; None for methods without a sharing partition."""
        cuts = self.get("cuts")
        return None if cuts is None else [int(c) for c in cuts]

    @property
    def labels(self) -> list[list[int]] | None:
        """(layers, clients) each client's cluster at each layer (-1: in none), or None."""
        labels = self.get("labels")
        return None if labels is None else [list(row) for row in labels]

    @property
    def label_counts(self) -> list[list[int]] | None:
        """(clients, labels) training label counts, or None when not recorded."""
        counts = self.get("label_counts")
        return counts or None

    @property
    def planted_groups(self) -> list[str] | None:
        """(clients,) each client's planted group, or None when the run had none."""
        groups = self.get("planted_groups")
        return None if groups is None else [str(g) for g in groups]

    @property
    def planted_levels(self) -> list[list[str]] | None:
        """(depth, clients) each client's group prefix at every depth of the planted hierarchy, or None."""
        levels = self.get("planted_levels")
        return None if levels is None else [[str(g) for g in level] for level in levels]

    @property
    def ari(self) -> list[list[float | None]] | None:
        """(layers, depth) ARI of each layer's partition against the planted groups, or None."""
        ari = self.get("ari")
        return None if ari is None else [[_float(v) for v in row] for row in ari]

    @property
    def plan(self) -> dict[str, Any] | None:
        """The FedTreeLoRA sharing plan, or None for methods without one."""
        plan = self.get("plan")
        return plan if isinstance(plan, dict) else None

    @property
    def finding(self) -> str | None:
        """The line the run printed where it made its clusters, when it recorded one."""
        finding = self.get("finding")
        return str(finding) if finding else None

    @property
    def clusters(self) -> int | None:
        """FedLEASE's one clustering: its cluster count, or None for other methods."""
        return _int(self.get("clusters"))

    @property
    def silhouette(self) -> dict[int, float] | None:
        """FedLEASE's candidate cluster count -> silhouette, or None for other methods."""
        scores = self.get("silhouette")
        return {int(k): float(v) for k, v in scores.items()} if isinstance(scores, Mapping) else None

    def clustering_finding(self, personal: bool = False) -> str | None:
        """The line of :func:`fedtreelora.core.findings.run_finding` from this summary's fields (the
        recorded :attr:`finding` of a finished run, recomputed for runs written before it was recorded).

        Args:
            personal: the run added a personal expert (``fedtreelora.personal``).
        """
        from fedtreelora.core.findings import run_finding  # core (scipy, torch) only when a line is asked for

        return run_finding(
            plan=self.plan,
            clusters=self.clusters,
            silhouette=self.silhouette,
            ari=self.ari,
            labels=self.labels,
            label_counts=self.label_counts,
            personal=personal,
        )

    def label_prior(self) -> LabelPrior | None:
        """How closely the deepest layer's clusters follow the clients' majority class, from the
        summary's ``labels``, ``label_counts`` and ``ari``; None without a sharing partition or counts."""
        from fedtreelora.core.findings import recorded_label_prior

        return recorded_label_prior(self.labels, self.label_counts, self.ari)

    @property
    def trainable_params_per_client(self) -> int | None:
        """One client's trainable parameters in the last round's phase."""
        return _int(self.get("trainable_params_per_client"))

    @property
    def backbone_params(self) -> int | None:
        """The backbone's parameters (the adapters' excluded)."""
        return _int(self.get("backbone_params"))

    @property
    def has_ari(self) -> bool:
        """Whether the run recorded :attr:`ari` (None for a method without a sharing partition on a
        federation with planted groups; absent without planted groups)."""
        return "ari" in self

    @property
    def trainable_percent(self) -> float | None:
        """Those as a percentage of the backbone's parameters."""
        return _float(self.get("trainable_percent"))

    @property
    def privacy(self) -> PrivacyRecord | None:
        """With ``privacy`` on, the run's privacy record (the resolved settings, ``upload_rounds``, the
        final ``epsilon`` and ``epsilon_server``, ``per_client_epsilon_server``); None when off, and in
        runs written before it existed."""
        privacy = self.get("privacy")
        return PrivacyRecord(privacy) if isinstance(privacy, Mapping) else None

    @property
    def wall_seconds(self) -> float | None:
        """The run's wall time in seconds."""
        return _float(self.get("wall_seconds"))


@dataclass(frozen=True)
class ComparisonFolder:
    """A comparison folder (what ``fedtreelora compare --out DIR`` writes): one run folder per (dataset,
    method, seed) under ``runs/<dataset>/<method>/seed<k>/``, and the comparison's outputs beside them
    (``table.md``, ``table.csv``, ``compare.json``, ``compare.png``).

    Attributes:
        root: the folder.
    """

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def runs_dir(self) -> Path:
        """The folder of the run folders."""
        return self.root / "runs"

    @property
    def compare_json(self) -> Path:
        """The comparison's record (JSON): its rows, settings and every run's headline numbers."""
        return self.root / "compare.json"

    def run(self, dataset: str, method: str, seed: int) -> RunFolder:
        """The run folder of one (dataset, method or variant, seed)."""
        return RunFolder(self.runs_dir / dataset / method / f"seed{seed}")

    def runs(self) -> list[tuple[str, str, int, RunFolder]]:
        """``(dataset, method, seed, folder)`` of every finished run (a readable summary), sorted by
        dataset, method and seed."""
        found = []
        for path in self.runs_dir.glob("*/*/seed*"):
            seed = path.name.removeprefix("seed")
            if path.is_dir() and seed.isdigit() and RunFolder(path).summary.is_file():
                found.append((path.parent.parent.name, path.parent.name, int(seed), RunFolder(path)))
        return sorted(found, key=lambda run: run[:3])

    def read_compare(self) -> dict[str, Any]:
        """The comparison's record (``compare.json``).

        Raises:
            FileNotFoundError when the comparison has not been written.
        """
        record: dict[str, Any] = _read_json(self.compare_json)
        return record


PER_CLIENT_KEYS = {
    "best_mean": "per_client_best_round",
    "best_federated_mean": "per_client_best_federated_round",
    "final_mean": "per_client",
}
"""A headline score's key -> the summary key of each client's score at that round."""


def jsonable(value: Any) -> Any:
    """``value`` with non-finite floats as None, tuples as lists, keys as str and arrays as lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return jsonable(value.tolist())
    return value


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file, then rename), so a crash never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(jsonable(data), indent=2) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


@dataclass(frozen=True)
class RunFolder:
    """One run folder: the paths of its files, and typed readers and writers for them.

    Readers of optional files return None (or an empty list) when the file is absent; see each one.

    Attributes:
        root: the folder.
    """

    root: Path

    #: folder next to the markdown report that holds its PNG figures (also named in the report's links)
    FIGURES_DIR: ClassVar[str] = "report_files"

    def __post_init__(self) -> None:
        # A command-line argument arrives as str; the dataclass is frozen, hence object.__setattr__.
        object.__setattr__(self, "root", Path(self.root))

    # --- paths ---------------------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        """The resolved experiment config (YAML)."""
        return self.root / "config.yaml"

    @property
    def partition(self) -> Path:
        """The partition record (JSON): each client's examples and label counts."""
        return self.root / "partition.json"

    @property
    def metrics(self) -> Path:
        """The per-client round records (JSON lines)."""
        return self.root / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        """The run summary (JSON), written when the run finishes."""
        return self.root / "summary.json"

    @property
    def clients_dir(self) -> Path:
        """The folder of the clients' final adapter states (the trained ones; the received ones in
        :attr:`received_dir`)."""
        return self.root / "clients"

    @property
    def received_dir(self) -> Path:
        """The folder of the clients' final received models."""
        return self.clients_dir / "received"

    def client_models_dir(self, model: ClientModel = "trained") -> Path:
        """The folder of one kind of the clients' final models."""
        if model not in CLIENT_MODELS:
            raise ValueError(f"unknown client model {model!r}; one of {', '.join(CLIENT_MODELS)}")
        return self.received_dir if model == "received" else self.clients_dir

    @property
    def client_meta(self) -> Path:
        """What rebuilds the model around the clients' states (JSON)."""
        return self.clients_dir / "meta.json"

    def client_state_file(self, client: int, model: ClientModel = "trained") -> Path:
        """Client ``client``'s final adapter state (safetensors): the trained one, or the received one."""
        return self.client_models_dir(model) / f"client_{client:03d}.safetensors"

    @property
    def checkpoints(self) -> Path:
        """The checkpoint folder (its contents: :mod:`fedtreelora.engines.checkpoint`)."""
        return self.root / "checkpoints"

    @property
    def checkpoint_pointer(self) -> Path:
        """The file naming the latest complete checkpoint (the commit point of a checkpoint)."""
        return self.checkpoints / "latest.json"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard's event folder."""
        return self.root / "tensorboard"

    @property
    def nodes(self) -> Path:
        """A Flower run's node of each client (JSON)."""
        return self.root / "nodes.json"

    @property
    def report_html(self) -> Path:
        """The self-contained HTML report."""
        return self.root / "report.html"

    @property
    def report_md(self) -> Path:
        """The markdown report (its figures in :attr:`report_figures`)."""
        return self.root / "report.md"

    @property
    def report_figures(self) -> Path:
        """The markdown report's PNG figures."""
        return self.root / self.FIGURES_DIR

    # --- reading -------------------------------------------------------------------------------------
    def has_checkpoint(self) -> bool:
        """True when a complete checkpoint exists (so the run can resume)."""
        return self.checkpoint_pointer.is_file()

    def read_config(self) -> ExperimentConfig:
        """The run's config, validated with today's schema.

        Raises:
            ConfigError when the file is absent or not a mapping; pydantic's ValidationError (a
            ValueError) when it does not validate; yaml.YAMLError when it is not YAML.
        """
        return load_config(self.config)

    def read_config_dict(self) -> dict[str, Any]:
        """The run's config as a plain dict, unvalidated; {} when absent or empty."""
        return (yaml.safe_load(self.config.read_text()) or {}) if self.config.is_file() else {}

    def read_summary(self) -> dict[str, Any] | None:
        """The run summary; None when the run has not finished: no summary, or one that cannot be read
        as a JSON object."""
        if not self.summary.is_file():
            return None
        try:
            summary = _read_json(self.summary)
        except (OSError, json.JSONDecodeError):
            return None
        return summary if isinstance(summary, dict) else None

    def require_summary(self) -> dict[str, Any]:
        """The run summary of a finished run.

        Raises:
            FileNotFoundError when there is none (the run has not finished); json.JSONDecodeError
            when it is not JSON.
        """
        if not self.summary.is_file():
            raise FileNotFoundError(f"{str(self.root)!r} holds no {self.summary.name}; is it a finished run folder?")
        summary: dict[str, Any] = _read_json(self.summary)
        return summary

    def read_run_summary(self) -> RunSummary | None:
        """:meth:`read_summary`, typed; None when the run has not finished."""
        summary = self.read_summary()
        return None if summary is None else RunSummary(summary)

    def require_run_summary(self) -> RunSummary:
        """:meth:`require_summary`, typed (raises as it does)."""
        return RunSummary(self.require_summary())

    def read_complete_summary(self, records: Sequence[Mapping[str, Any]] | None = None) -> RunSummary | None:
        """:meth:`read_run_summary`, with what a summary written before the best federated round was
        recorded lacks computed from its history and per-client records
        (:func:`fedtreelora.headline.complete_summary`): what the report and ``compare`` read. None when
        the run has not finished.

        Args:
            records: the run's per-client records when the caller has read them already
                (:meth:`read_metrics`); read here only when the summary lacks something.
        """
        summary = self.read_run_summary()
        return None if summary is None else self._completed(summary, records)

    def require_complete_summary(self, records: Sequence[Mapping[str, Any]] | None = None) -> RunSummary:
        """:meth:`read_complete_summary` of a finished run (raises as :meth:`require_summary` does)."""
        return self._completed(self.require_run_summary(), records)

    def _completed(self, summary: RunSummary, records: Sequence[Mapping[str, Any]] | None) -> RunSummary:
        if summary.is_complete:
            return summary
        from fedtreelora.headline import complete_summary  # headline reads the records defined here

        return RunSummary(complete_summary(summary, self.read_metrics() if records is None else records))

    def read_client_records(self) -> list[ClientRecord]:
        """:meth:`read_metrics`, typed: every per-client round record in the order written."""
        return [ClientRecord(row) for row in self.read_metrics()]

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every per-client round record, in the order written (score-only records of clients that sat a
        round out included: :func:`trained_record`); [] when absent."""
        if not self.metrics.is_file():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    def read_partition(self) -> dict[str, Any] | None:
        """The partition record; None when absent."""
        return _read_json(self.partition) if self.partition.is_file() else None

    def read_partition_text(self) -> str | None:
        """The partition record as written (to compare two runs' partitions byte for byte); None when absent."""
        return self.partition.read_text() if self.partition.is_file() else None

    def read_client_meta(self) -> dict[str, Any] | None:
        """What rebuilds the model around the clients' states; None when the run saved none."""
        return _read_json(self.client_meta) if self.client_meta.is_file() else None

    def client_state_files(self, model: ClientModel = "trained") -> list[Path]:
        """Every saved client state file of one kind, sorted by name (client order); [] when none were saved."""
        folder = self.client_models_dir(model)
        return sorted(folder.glob("client_*.safetensors")) if folder.is_dir() else []

    def saved_clients(self, model: ClientModel = "trained") -> list[int]:
        """The clients whose final state of one kind the run saved (a Flower node may keep its own), in
        file order."""
        return [int(path.name.split(".", 1)[0].removeprefix("client_")) for path in self.client_state_files(model)]

    def client_state(self, client: int, model: ClientModel = "trained") -> dict[str, torch.Tensor]:
        """Client ``client``'s final adapter state, trained or received (keys as in
        :class:`fedtreelora.adapters.AdapterBank`)."""
        from safetensors.torch import load_file  # torch only when tensors are wanted

        return load_file(str(self.client_state_file(client, model)))

    def client_arrays(self, client: int, keys: Iterable[str], model: ClientModel = "trained") -> dict[str, np.ndarray]:
        """Only the named tensors of client ``client``'s state, as numpy arrays (no torch needed)."""
        from safetensors import safe_open

        with safe_open(str(self.client_state_file(client, model)), framework="np") as f:
            return {key: np.asarray(f.get_tensor(key)) for key in keys}

    # --- writing -------------------------------------------------------------------------------------
    def write_config(self, config: ExperimentConfig) -> None:
        """Write the resolved config (every key, defaults included)."""
        self.config.write_text(dump_config(config))

    def write_partition(self, partition: Mapping[str, Any]) -> None:
        """Write the partition record."""
        write_json(self.partition, partition)

    def append_metrics(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Append one line per client record."""
        with self.metrics.open("a") as f:
            for record in records:
                f.write(json.dumps(jsonable(record)) + "\n")

    def truncate_metrics(self, next_round: int) -> None:
        """Keep only the records of rounds before ``next_round`` (none for 0), lines unchanged; creates
        an empty file when absent."""
        path = self.metrics
        kept = []
        if next_round > 0 and path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["round"] < next_round]
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)

    def write_client_state(
        self, client: int, state: Mapping[str, torch.Tensor], model: ClientModel = "trained"
    ) -> None:
        """Write client ``client``'s final adapter state (trained or received) atomically."""
        from safetensors.torch import save_file

        self.client_models_dir(model).mkdir(parents=True, exist_ok=True)
        path = self.client_state_file(client, model)
        tmp = path.with_name(path.name + ".tmp")
        save_file({key: t.contiguous() for key, t in state.items()}, str(tmp))
        os.replace(tmp, path)

    def write_client_meta(self, meta: Mapping[str, Any]) -> None:
        """Write what rebuilds the model around the clients' states."""
        self.clients_dir.mkdir(exist_ok=True)
        write_json(self.client_meta, meta)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Write the run summary (last: it marks the run as finished)."""
        write_json(self.summary, summary)

    def write_nodes(self, nodes: Mapping[int, Any]) -> None:
        """Write a Flower run's node of each client."""
        write_json(self.nodes, {str(c): n for c, n in nodes.items()})
