"""Secure aggregation of cluster experts on Flower (``privacy.secure_aggregation``; docs/privacy.md).

Flower's SecAgg+ (``SecAggPlusWorkflow`` on the server, ``secaggplus_mod`` on the nodes) sums one vector
over a round's nodes without showing the server any single vector. Each node sends its upload in its
cluster's slots (:mod:`.slots`), so that one secure sum gives every cluster's sum and count.

The server then hands the strategy, for each client whose vector is in the sum, its cluster's mean in
place of its upload (:func:`~fedtreelora.engines.flower.slots.cluster_means`). Averaging those gives
exactly the cluster and external experts of the cluster sums (the mean of identical values is that
value; the mean over the others is ``(total - cluster) / (W - W_cluster)``), so the strategies run
unchanged and never see one upload.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
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

from fedtreelora.config import PrivacyConfig
from fedtreelora.engines.flower.slots import Slots
from fedtreelora.strategies.common import ClusteredAfterWarmup

Tensors = dict[str, torch.Tensor]

#: the ConfigRecord key of a secure train message's fedtreelora config (JSON text)
CONFIG_KEY = "fedtreelora"


def secure_round(strategy: Any, rnd: int) -> bool:
    """Whether round ``rnd``'s uploads are summed securely: every round, except the warm-up of a method
    that clusters from individual warm-up uploads (FedTreeLoRA, FedLEASE), whose uploads go in the clear."""
    return not (isinstance(strategy, ClusteredAfterWarmup) and strategy.is_warmup(rnd))


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
