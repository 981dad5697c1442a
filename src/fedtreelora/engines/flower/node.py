"""A node's client: which fedtreelora client it is, its data, and the model it trains.

Built once per process and cached: a Flower simulation worker serves many virtual nodes of one run
(they share one backbone, as in the in-process engine), a deployed SuperNode serves one site.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedtreelora.config import ExperimentConfig
from fedtreelora.data import ClientData, load_classification
from fedtreelora.engines.setup import Federation, build_federation, build_model_side
from fedtreelora.train import encode

_CACHE: dict[tuple[str, str], Federation] = {}


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

    def info(self) -> dict[str, Any]:
        """What the node tells the server about itself: counts only, no text, no per-example labels."""
        fed, i = self.fed, self.index
        return {
            "client": self.client,
            "num-train": len(fed.train_data[i]),
            "num-val": len(fed.val_data[i]),
            "num-labels": fed.num_labels,
            "label-names": list(fed.label_names),
            "train-label-counts": [int(v) for v in fed.clients[i].train_label_counts],
            "val-label-counts": [int(v) for v in fed.clients[i].val_label_counts],
        }


def _site_federation(config: ExperimentConfig, data: str, client: int) -> Federation:
    """A one-client federation over a site's own data (every example of it; no partitioning)."""
    d = config.data
    dataset = load_classification(
        data,
        text_column=d.text_column,
        text_pair_column=d.text_pair_column,
        label_column=d.label_column,
        train_split=d.train_split,
        validation_split=d.validation_split,
    )
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


def node_client(config: ExperimentConfig, config_json: str, node_config: Mapping[str, Any]) -> NodeClient:
    """The client this node runs, from its node config.

    ``client-id`` + ``data`` (deployment) take precedence over ``partition-id`` (simulation).

    Raises:
        ValueError: no usable node config, or an id outside the federation.
    """
    num_clients = config.data.num_clients
    if "client-id" in node_config:
        client = int(node_config["client-id"])
        data = str(node_config.get("data", "") or config.data.dataset)
        key = (config_json, f"site:{data}:{client}")
        if key not in _CACHE:
            _CACHE[key] = _site_federation(config, data, client)
        index = 0
    elif "partition-id" in node_config:
        client = index = int(node_config["partition-id"])
        partitions = int(node_config.get("num-partitions", num_clients))
        if partitions != num_clients:
            raise ValueError(
                f"the simulation has {partitions} nodes but data.num_clients is {num_clients}; "
                f"set num-supernodes = {num_clients} in the Flower connection options"
            )
        key = (config_json, "partition")
        if key not in _CACHE:
            _CACHE[key] = build_federation(config, num_slots=1)
    else:
        raise ValueError(
            "this SuperNode has no client: start it with --node-config 'client-id=K data=\"PATH\"' "
            "(deployment) or run it in a Flower simulation (partition-id)"
        )
    if not 0 <= client < num_clients:
        raise ValueError(f"node config client-id={client} is outside 0..{num_clients - 1} (data.num_clients)")
    return NodeClient(client=client, fed=_CACHE[key], index=index)
