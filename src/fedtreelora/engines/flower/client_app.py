"""The fedtreelora ClientApp: the in-process engine's client round, behind Flower messages.

Messages it answers:

* ``query`` with ``action = "info"``: the node's client id and example counts (no text, no labels);
* ``train``: load the committed personal state, apply the server's payload, train, evaluate, and
  reply with the upload (cut as in process, through the federation's upload transforms) and scalar
  metrics; the new state waits, pending, until the server says the upload was accepted (a rejected or
  late upload leaves the client as it was, as in the in-process engine);
* ``evaluate``: after the server's step, settle the pending state, then score the committed state plus
  the server's payload in the next round's phase (the received model) and reply with the scores; the
  state does not change;
* with ``privacy.secure_aggregation``, the ``train`` messages of SecAgg+'s stages
  (:mod:`.secure`): Flower's ``secaggplus_mod`` answers the key exchanges, and in the stage that collects
  the masked vectors the node trains as above and its upload leaves only in its cluster's slots, masked;
* ``query`` with ``action = "finish"``: settle the last pending state and, if asked, send the final
  personal adapters.

The personal state (lambda logits, routers, local experts, every adapter) lives in the node's
``context.state`` between rounds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtreelora.engines.flower.node import client_id, node_client, node_info
from fedtreelora.engines.flower.phases import node_phase
from fedtreelora.engines.flower.records import Tensors, from_array_record, to_array_record
from fedtreelora.engines.flower.secure import (
    is_secure,
    read_instructions,
    secure_reply,
    secure_round,
    secure_train_mod,
)
from fedtreelora.engines.flower.settings import FlowerRunSettings
from fedtreelora.engines.flower.slots import Slots, slot_vector
from fedtreelora.engines.setup import Federation, client_seed
from fedtreelora.train import ClientResult, run_client_round
from fedtreelora.train.received import evaluate_received

#: keys in the node's context.state
COMMITTED, PENDING = "fedtreelora.state", "fedtreelora.pending"

app = ClientApp()


def _settle(context: Context, accepted: bool) -> None:
    """Commit the pending state if the server accepted the upload it came with; else drop it."""
    pending = context.state.get(PENDING)
    if pending is not None:
        if accepted:
            context.state[COMMITTED] = pending
        del context.state[PENDING]


@app.query()
def query(msg: Message, context: Context) -> Message:
    settings = FlowerRunSettings.from_run_config(context.run_config)
    config = msg.content["config"]
    action = str(config["action"])
    if action == "info":
        return Message(
            RecordDict({"info": ConfigRecord(node_info(settings.experiment, context.node_config))}), reply_to=msg
        )
    if action == "finish":
        _settle(context, bool(config["accepted"]))
        content = RecordDict({"info": ConfigRecord({"client": client_id(settings.experiment, context.node_config)})})
        state = context.state.get(COMMITTED)
        if bool(config.get("send-state", False)) and isinstance(state, ArrayRecord):
            content["state"] = state
        return Message(content, reply_to=msg)
    raise ValueError(f"unknown query action {action!r}")


def _state(context: Context, fed: Federation) -> Tensors:
    """The node's committed personal state (the shared initialisation before its first round)."""
    committed = context.state.get(COMMITTED)
    return from_array_record(committed) if isinstance(committed, ArrayRecord) else dict(fed.initial_state)


def _numbers(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The plain numbers of ``metrics`` (what a ``MetricRecord`` carries)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    settings = FlowerRunSettings.from_run_config(context.run_config)
    cfg: Mapping[str, Any] = msg.content.config_records["config"]
    node = node_client(settings.experiment, context.node_config, list(cfg["label-names"]))
    rnd = int(cfg["round"])  # the round whose aggregation is scored
    _settle(context, bool(cfg["accepted"]))
    fed = node.fed
    train_data, val_data = fed.client_data(rnd, node.index)
    scores = evaluate_received(
        fed.bank,
        fed.classifier.tokenizer,
        phase=node_phase(fed.strategy, rnd + 1, cfg, node.client),
        state=_state(context, fed),
        payload=from_array_record(msg.content.array_records.get("payload")),
        train_data=train_data,
        val_data=val_data,
        settings=fed.settings,
        seed=client_seed(settings.experiment.seed, rnd, node.client),
        device=fed.device,
    )
    metrics = _numbers(scores)
    metrics["client"] = node.client
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def _train(context: Context, cfg: Mapping[str, Any], payload: Tensors) -> tuple[ClientResult, int]:
    """Settle the last pending state, train on ``payload`` in the round ``cfg`` names, keep the new state
    pending; returns the result and the node's client id."""
    settings = FlowerRunSettings.from_run_config(context.run_config)
    node = node_client(settings.experiment, context.node_config, list(cfg["label-names"]))
    rnd = int(cfg["round"])
    _settle(context, bool(cfg["accepted"]))
    fed = node.fed
    phase = node_phase(fed.strategy, rnd, cfg, node.client)
    if settings.experiment.privacy.secure_aggregation and secure_round(fed.strategy, rnd) != bool(
        cfg.get("secure", False)
    ):
        raise ValueError(
            f"round {rnd + 1}: privacy.secure_aggregation is on and this round's upload must go "
            f"{'through SecAgg+' if secure_round(fed.strategy, rnd) else 'in the clear'}, but the server asked "
            "otherwise; server and nodes must run the same fedtreelora version and experiment config"
        )
    train_data, val_data = fed.client_data(rnd, node.index)
    result = run_client_round(
        fed.bank,
        fed.classifier.tokenizer,
        state=_state(context, fed),
        payload=payload,
        upload_keys=list(cfg["upload-keys"]),
        train_data=train_data,
        val_data=val_data,
        seed=client_seed(settings.experiment.seed, rnd, node.client),
        phase=phase,
        settings=fed.settings,
        device=fed.device,
        client=node.client,
        rnd=rnd,
        upload_transforms=fed.upload_transforms,
    )
    context.state[PENDING] = to_array_record(result.state)
    return result, node.client


def _train_secure(msg: Message, context: Context) -> Message:
    """SecAgg+'s stage that collects the masked vectors: train, then reply with the upload inside its
    cluster's slots (``secaggplus_mod`` masks it) and the values SecAgg+ will clip counted."""
    cfg, payload = read_instructions(msg)
    result, client = _train(context, cfg, payload)
    arrays, clipped = slot_vector(result.upload, Slots.from_json(cfg["slots"]))
    metrics = {**_numbers(result.metrics), "client": client, "secure_clipped": clipped}
    return secure_reply(msg, arrays, metrics)


@app.train(mods=[secure_train_mod])
def train(msg: Message, context: Context) -> Message:
    if is_secure(msg):
        return _train_secure(msg, context)
    cfg: Mapping[str, Any] = msg.content.config_records["config"]
    result, client = _train(context, cfg, from_array_record(msg.content.array_records.get("payload")))
    metrics = _numbers(result.metrics)
    metrics["client"] = client
    return Message(
        RecordDict({"upload": to_array_record(result.upload), "metrics": MetricRecord(metrics)}), reply_to=msg
    )
