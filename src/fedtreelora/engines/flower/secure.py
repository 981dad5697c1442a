"""Secure aggregation of cluster experts on Flower (``privacy.secure_aggregation``; docs/privacy.md).

Flower's SecAgg+ (``SecAggPlusWorkflow`` on the server, ``secaggplus_mod`` on the nodes) sums one vector
over a round's nodes without showing the server any single vector. To get every cluster's sum from that
one sum, a node places its upload in its own cluster's **slot**: for each uploaded tensor x (shape S) of
a layer with C clusters, the node sends a (C, *S) array that is zero except ``[slot] = r * x``, and one
count entry per tensor and cluster that is zero except ``[slot] = r * u`` (r: the client's averaging
weight over the round's largest, 1 for uniform averaging; u: half the clipping range). The secure sum
of these arrays holds, per cluster, the sum of its members' weighted uploads and their weight; the
external expert is the total minus the cluster. FedIT is the one-cluster case.

The server then hands the strategy, for each client whose vector is in the sum, its cluster's mean in
place of its upload (:func:`cluster_means`). Averaging those gives exactly the cluster and external
experts of the cluster sums (the mean of identical values is that value; the mean over the others is
``(total - cluster) / (W - W_cluster)``), so the strategies run unchanged and never see one upload.

SecAgg+ clips each value to ``[-clip, clip]`` and quantises it to ``quantization_range`` levels with
stochastic rounding: each member's value is off by less than one step ``2 clip / levels``, so a cluster
mean (uniform weights) is off by less than one step; zeros (the other clusters' slots) quantise exactly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedtreelora.config import ExperimentConfig, PrivacyConfig
from fedtreelora.strategies.common import ClusteredAfterWarmup

Tensors = dict[str, torch.Tensor]

#: the ConfigRecord key of a secure train message's fedtreelora config (JSON text)
CONFIG_KEY = "fedtreelora"
#: bytes per value of a masked vector on the wire (SecAgg+ sends int64 arrays)
MASKED_VALUE_BYTES = 8


def secure_round(strategy: Any, rnd: int) -> bool:
    """Whether round ``rnd``'s uploads are summed securely: every round, except the warm-up of a method
    that clusters from individual warm-up uploads (FedTreeLoRA, FedLEASE), whose uploads go in the clear."""
    return not (isinstance(strategy, ClusteredAfterWarmup) and strategy.is_warmup(rnd))


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


# --- the node's side ------------------------------------------------------------------------------------------------
def is_secure(msg: Message) -> bool:
    """Whether a train message is a stage of SecAgg+ (its records carry the protocol's configs)."""
    return RECORD_KEY_CONFIGS in msg.content.config_records


def secure_train_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod`` for the stages of SecAgg+; a plain train message passes through."""
    from flwr.client.mod import secaggplus_mod

    if is_secure(msg):
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def read_instructions(msg: Message) -> tuple[dict[str, Any], Tensors]:
    """A secure train message's fedtreelora config and payload (as :func:`instructions` packed them)."""
    fitins = recorddict_to_fitins(msg.content, keep_input=True)
    cfg = json.loads(str(fitins.config[CONFIG_KEY]))
    arrays = parameters_to_ndarrays(fitins.parameters)
    payload = {k: torch.from_numpy(np.array(a)).float() for k, a in zip(cfg["payload-keys"], arrays, strict=True)}
    return cfg, payload


def secure_reply(msg: Message, arrays: list[np.ndarray], metrics: Mapping[str, Any]) -> Message:
    """The reply ``secaggplus_mod`` masks: the slot vector as the legacy fit result (weight 1: the
    weights are inside the vector) with the client's scalar metrics."""
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), num_examples=1, metrics=dict(metrics))
    return Message(fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


# --- the server's side ----------------------------------------------------------------------------------------------
def instructions(config: Mapping[str, Any], payload: Mapping[str, torch.Tensor], slots: Slots) -> FitIns:
    """What a node needs to train in a secure round, as SecAgg+'s legacy fit instructions: the payload
    as parameters, the config (with the payload's keys and the node's slots) as JSON text."""
    keys = sorted(payload)
    cfg = {**config, "payload-keys": keys, "slots": slots.to_json()}
    arrays = [payload[k].detach().to("cpu", torch.float32).numpy() for k in keys]
    return FitIns(ndarrays_to_parameters(arrays), {CONFIG_KEY: json.dumps(cfg)})


class _OneRound(LegacyStrategy):
    """The legacy strategy SecAgg+'s workflow drives for one round: it hands out each node's fit
    instructions and keeps what comes back (the sum, and each contributing node's metrics)."""

    def __init__(self, grid: Grid, fitins: Mapping[int, FitIns]) -> None:
        self.grid = grid
        self.fitins = dict(fitins)
        self.results: list[tuple[ClientProxy, FitRes]] = []

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        run_id = self.grid.run.run_id
        return [(GridClientProxy(node, self.grid, run_id), ins) for node, ins in self.fitins.items()]

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[Any]
    ) -> tuple[Parameters | None, dict[str, Any]]:
        self.results = list(results)
        return None, {}

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager) -> list[Any]:
        return []

    def aggregate_evaluate(self, server_round: int, results: list[Any], failures: list[Any]) -> tuple[None, dict]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None


@dataclass(frozen=True)
class SecureSum:
    """What one round of SecAgg+ gave the server.

    Attributes:
        total: the sum of the contributing nodes' slot vectors (float64 arrays), empty when the protocol
            halted (too few nodes).
        metrics: node id -> the scalar metrics of every node whose masked vector is in the sum.
    """

    total: list[np.ndarray]
    metrics: dict[int, dict[str, Any]]


def secure_sum(
    grid: Grid, rnd: int, fitins: Mapping[int, FitIns], privacy: PrivacyConfig, timeout: float | None
) -> SecureSum:
    """Run SecAgg+ (Flower's ``SecAggPlusWorkflow``) for round ``rnd`` over the nodes of ``fitins``
    (node id -> its instructions) and return the sum of their slot vectors.

    Every node is every other's neighbour (``num_shares=1.0``); ``max_weight=1`` with weight 1 per node,
    so the workflow's weighted mean is the sum over the ``n`` contributing nodes divided by ``n``.
    """
    shim = _OneRound(grid, fitins)
    base = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    context = LegacyContext(base, strategy=shim)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd + 1})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    clip = json.loads(str(next(iter(fitins.values())).config[CONFIG_KEY]))["slots"]["clipping-range"]
    workflow = SecAggPlusWorkflow(
        num_shares=1.0,
        reconstruction_threshold=privacy.secure_reconstruction_threshold,
        max_weight=1.0,
        clipping_range=float(clip),
        quantization_range=privacy.secure_quantization_range,
        timeout=timeout,
    )
    workflow(grid, context)
    if not shim.results:
        return SecureSum([], {})
    n = len(shim.results)
    mean = parameters_to_ndarrays(shim.results[0][1].parameters)
    total = [np.asarray(a, dtype=np.float64) * n for a in mean]
    metrics = {proxy.node_id: dict(res.metrics) for proxy, res in shim.results}
    return SecureSum(total, metrics)
