"""A node's client: which fedtreelora client it is, its data, and the model it trains.

Built once per process and cached: a Flower simulation worker serves many virtual nodes of one run
(they share one backbone, as in the in-process engine), a deployed SuperNode serves one site.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedtreelora.config import ExperimentConfig
from fedtreelora.data import ClassificationDataset, ClientData, InstructionDataset, LabeledTexts, drift_field
from fedtreelora.engines.setup import (
    Federation,
    build_federation,
    build_model_side,
    encode_split,
    load_configured_classification,
    load_configured_instructions,
    upload_chain,
)
from fedtreelora.errors import ConfigError

_FEDERATIONS: dict[tuple[str, ...], Federation] = {}
_SITE_DATA: dict[tuple[str, ...], ClassificationDataset | InstructionDataset] = {}


@dataclass(frozen=True)
class NodeClient:
    """One fedtreelora client on a Flower node.

    Attributes:
        client: the client id (0..N-1) the server knows it by.
        fed: a federation holding this client's data (the whole partition in simulation, only the
            site's own data in deployment).
        index: this client's row in ``fed.train_data`` / ``fed.val_data``.
    """

    client: int
    fed: Federation
    index: int


def _relabel(split: LabeledTexts, names: Sequence[str]) -> LabeledTexts:
    """``split`` with label ids in the vocabulary ``names`` (which must hold every name it uses)."""
    position = {name: i for i, name in enumerate(names)}
    missing = sorted(set(split.label_names) - set(position))
    if missing:
        raise ValueError(f"the site's labels {missing} are not in the federation's label set {list(names)}")
    mapping = np.asarray([position[n] for n in split.label_names], dtype=np.int64)
    return LabeledTexts(split.texts, split.text_pairs, mapping[split.labels], list(names))


#: the column a site's instruction files name their task in when ``data.task_column`` is unset
SITE_TASK_COLUMN = "task"


def check_sites_without_drift(config: ExperimentConfig) -> None:
    """A deployed site reads its own data folder, which holds one set of labels: it cannot follow a
    drift schedule (``data.groups[i].drift``).

    Raises:
        ConfigError: some group of the config drifts.
    """
    where = drift_field(config.data)
    if where is not None:
        raise ConfigError(
            f"{where} is set, but a deployed site reads its own data folder, which holds one set of labels and "
            "cannot follow a drift schedule; remove the drift, or run the federation in the in-process engine "
            "or in a Flower simulation (which read the partition and follow it)"
        )


def site_dataset(
    config: ExperimentConfig, data: str, label_names: Sequence[str] | None = None
) -> ClassificationDataset | InstructionDataset:
    """A site's own data, read with the config's column options.

    Classification: labels in ``label_names`` order when given (sites holding different subsets of
    the labels agree on one vocabulary). Instruction data: every task the site holds (``data.tasks``
    selects tasks of a shared source, not of a site), named by ``data.task_column``, else a ``task``
    column when the files have one, else the category.
    """
    d = config.data
    key = (config.model_dump_json(), data)
    if key not in _SITE_DATA:
        if d.resolved_task() == "generation":
            _SITE_DATA[key] = load_configured_instructions(
                config, data, task_column=SITE_TASK_COLUMN, select_tasks=False
            )
        else:
            _SITE_DATA[key] = load_configured_classification(config, data)
    dataset = _SITE_DATA[key]
    if isinstance(dataset, InstructionDataset) or label_names is None or list(label_names) == list(dataset.label_names):
        return dataset
    return ClassificationDataset(
        dataset.name, _relabel(dataset.train, label_names), _relabel(dataset.validation, label_names)
    )


@dataclass(frozen=True)
class SiteCounts:
    """What a site's data amounts to, by label (classification) or task (instruction data).

    Attributes:
        names: the labels or tasks, in the site's order.
        train, validation: (names,) examples of each.
        categories: (names,) each task's category; None for classification.
    """

    names: list[str]
    train: np.ndarray
    validation: np.ndarray
    categories: list[str] | None = None


def site_counts(dataset: ClassificationDataset | InstructionDataset) -> SiteCounts:
    """Per-label (or per-task) example counts of a site's two pools."""
    if isinstance(dataset, InstructionDataset):
        names = dataset.task_names
        return SiteCounts(
            names,
            np.bincount(dataset.train.task_ids(names), minlength=len(names)),
            np.bincount(dataset.validation.task_ids(names), minlength=len(names)),
            [dataset.task_category(t) for t in names],
        )
    return SiteCounts(list(dataset.label_names), dataset.train.label_counts(), dataset.validation.label_counts())


def _site_federation(
    config: ExperimentConfig, dataset: ClassificationDataset | InstructionDataset, client: int
) -> Federation:
    """A one-client federation over a site's own data (every example of it; no partitioning)."""
    counts = site_counts(dataset)
    share = ClientData(
        client=client,
        train_indices=np.arange(len(dataset.train), dtype=np.int64),
        val_indices=np.arange(len(dataset.validation), dtype=np.int64),
        proportions=counts.train / max(1, counts.train.sum()),
        train_label_counts=counts.train,
        val_label_counts=counts.validation,
    )
    # The client-side strategy only answers phase(rnd); a full-size context keeps option checks equal.
    num_examples = (len(dataset.train),) * config.data.num_clients
    num_labels = 0 if isinstance(dataset, InstructionDataset) else dataset.num_labels
    side = build_model_side(config, num_labels=num_labels, num_examples=num_examples, num_slots=1)
    tok = side.classifier.tokenizer
    train = encode_split(config, tok, dataset.train, share.train_indices)
    val = encode_split(config, tok, dataset.validation, share.val_indices)
    return Federation(
        config, dataset, [share], side.classifier, side.bank, side.strategy, [train], [val],
        side.initial_state, side.settings, side.device, upload_chain(config, side.initial_state),
    )  # fmt: skip


def client_id(config: ExperimentConfig, node_config: Mapping[str, Any]) -> int:
    """The client a node runs: ``client-id`` (deployment) or ``partition-id`` (simulation).

    Raises:
        ValueError: no usable node config, or an id outside the federation.
    """
    num_clients = config.data.num_clients
    if "client-id" in node_config:
        client = int(node_config["client-id"])
    elif "partition-id" in node_config:
        client = int(node_config["partition-id"])
        partitions = int(node_config.get("num-partitions", num_clients))
        if partitions != num_clients:
            raise ValueError(
                f"the simulation has {partitions} nodes but data.num_clients is {num_clients}; "
                f"run it with --federation-config 'num-supernodes={num_clients}'"
            )
    else:
        raise ValueError(
            "this SuperNode has no client: start it with --node-config 'client-id=K data=\"PATH\"' "
            "(deployment) or run it in a Flower simulation (partition-id)"
        )
    if not 0 <= client < num_clients:
        raise ValueError(f"node config client-id={client} is outside 0..{num_clients - 1} (data.num_clients)")
    return client


def node_info(config: ExperimentConfig, node_config: Mapping[str, Any]) -> dict[str, Any]:
    """What a node tells the server about itself: counts and the label vocabulary; no text, no
    per-example labels."""
    client = client_id(config, node_config)
    if "client-id" in node_config:
        check_sites_without_drift(config)
        counts = site_counts(site_dataset(config, str(node_config.get("data", "") or config.data.dataset)))
        names, train_counts, val_counts, categories = counts.names, counts.train, counts.validation, counts.categories
    else:
        fed = node_client(config, node_config).fed
        train_counts, val_counts = fed.clients[client].train_label_counts, fed.clients[client].val_label_counts
        names = list(fed.label_names)
        dataset = fed.dataset
        categories = [dataset.task_category(t) for t in names] if isinstance(dataset, InstructionDataset) else None
    info: dict[str, Any] = {
        "client": client,
        "num-train": int(train_counts.sum()),
        "num-val": int(val_counts.sum()),
        "label-names": names,
        "train-label-counts": [int(v) for v in train_counts],
        "val-label-counts": [int(v) for v in val_counts],
    }
    if categories is not None:
        info["task-categories"] = categories
    return info


def node_client(
    config: ExperimentConfig, node_config: Mapping[str, Any], label_names: Sequence[str] | None = None
) -> NodeClient:
    """The client this node runs, with its model built (cached per process)."""
    client = client_id(config, node_config)
    config_json = config.model_dump_json()
    if "client-id" in node_config:
        check_sites_without_drift(config)
        data = str(node_config.get("data", "") or config.data.dataset)
        key = (config_json, "site", data, str(client), *(label_names or ()))
        if key not in _FEDERATIONS:
            _FEDERATIONS[key] = _site_federation(config, site_dataset(config, data, label_names), client)
        return NodeClient(client=client, fed=_FEDERATIONS[key], index=0)
    key = (config_json, "partition")
    if key not in _FEDERATIONS:
        _FEDERATIONS[key] = build_federation(config, num_slots=1)
    return NodeClient(client=client, fed=_FEDERATIONS[key], index=client)
