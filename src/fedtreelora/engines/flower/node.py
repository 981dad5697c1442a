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
from fedtreelora.data import ClassificationDataset, ClientData, LabeledTexts, load_classification
from fedtreelora.engines.setup import Federation, build_federation, build_model_side
from fedtreelora.train import encode

_FEDERATIONS: dict[tuple[str, ...], Federation] = {}
_SITE_DATA: dict[tuple[str, ...], ClassificationDataset] = {}


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


def site_dataset(
    config: ExperimentConfig, data: str, label_names: Sequence[str] | None = None
) -> ClassificationDataset:
    """A site's own data, read with the config's column options; labels in ``label_names`` order
    when given (sites holding different subsets of the labels agree on one vocabulary)."""
    d = config.data
    if d.resolved_task() != "classification":
        raise ValueError(
            f"data.task={d.resolved_task()!r}: deployment sites (--node-config data=...) read classification data "
            "for now; run generation on Flower in simulation (`fedtreelora flower simulate`)"
        )
    key = (config.model_dump_json(), data)
    if key not in _SITE_DATA:
        _SITE_DATA[key] = load_classification(
            data,
            text_column=d.text_column,
            text_pair_column=d.text_pair_column,
            label_column=d.label_column,
            train_split=d.train_split,
            validation_split=d.validation_split,
        )
    dataset = _SITE_DATA[key]
    if label_names is None or list(label_names) == list(dataset.label_names):
        return dataset
    return ClassificationDataset(
        dataset.name, _relabel(dataset.train, label_names), _relabel(dataset.validation, label_names)
    )


def _site_federation(config: ExperimentConfig, dataset: ClassificationDataset, client: int) -> Federation:
    """A one-client federation over a site's own data (every example of it; no partitioning)."""
    train_labels, val_labels = dataset.train.labels, dataset.validation.labels
    counts = np.bincount(train_labels, minlength=dataset.num_labels)
    share = ClientData(
        client=client,
        train_indices=np.arange(len(train_labels), dtype=np.int64),
        val_indices=np.arange(len(val_labels), dtype=np.int64),
        proportions=counts / max(1, counts.sum()),
        train_label_counts=counts,
        val_label_counts=np.bincount(val_labels, minlength=dataset.num_labels),
    )
    # The client-side strategy only answers phase(rnd); a full-size context keeps option checks equal.
    num_examples = (len(train_labels),) * config.data.num_clients
    side = build_model_side(config, num_labels=dataset.num_labels, num_examples=num_examples, num_slots=1)
    tok, max_length = side.classifier.tokenizer, config.model.max_length
    train = encode(tok, dataset.train.texts, dataset.train.text_pairs, train_labels, max_length)
    val = encode(tok, dataset.validation.texts, dataset.validation.text_pairs, val_labels, max_length)
    return Federation(
        config, dataset, [share], side.classifier, side.bank, side.strategy, [train], [val],
        side.initial_state, side.settings, side.device,
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
        dataset = site_dataset(config, str(node_config.get("data", "") or config.data.dataset))
        train_counts, val_counts = dataset.train.label_counts(), dataset.validation.label_counts()
        names = list(dataset.label_names)
    else:
        fed = node_client(config, node_config).fed
        train_counts, val_counts = fed.clients[client].train_label_counts, fed.clients[client].val_label_counts
        names = list(fed.label_names)
    return {
        "client": client,
        "num-train": int(train_counts.sum()),
        "num-val": int(val_counts.sum()),
        "label-names": names,
        "train-label-counts": [int(v) for v in train_counts],
        "val-label-counts": [int(v) for v in val_counts],
    }


def node_client(
    config: ExperimentConfig, node_config: Mapping[str, Any], label_names: Sequence[str] | None = None
) -> NodeClient:
    """The client this node runs, with its model built (cached per process)."""
    client = client_id(config, node_config)
    config_json = config.model_dump_json()
    if "client-id" in node_config:
        data = str(node_config.get("data", "") or config.data.dataset)
        key = (config_json, "site", data, str(client), *(label_names or ()))
        if key not in _FEDERATIONS:
            _FEDERATIONS[key] = _site_federation(config, site_dataset(config, data, label_names), client)
        return NodeClient(client=client, fed=_FEDERATIONS[key], index=0)
    key = (config_json, "partition")
    if key not in _FEDERATIONS:
        _FEDERATIONS[key] = build_federation(config, num_slots=1)
    return NodeClient(client=client, fed=_FEDERATIONS[key], index=client)
