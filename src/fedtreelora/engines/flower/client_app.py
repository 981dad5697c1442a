"""The fedtreelora ClientApp: the in-process engine's client round, behind Flower messages.

Messages it answers:

* ``query`` with ``action = "info"``: the node's client id and example counts (no text, no labels);
* ``train``: load the committed personal state, apply the server's payload, train, evaluate, and
  reply with the upload and scalar metrics; the new state waits, pending, until the server says the
  upload was accepted (a rejected or late upload leaves the client as it was, as in the in-process
  engine);
* ``query`` with ``action = "finish"``: settle the last pending state and, if asked, send the final
  personal adapters.

The personal state (lambda logits, routers, local experts, every adapter) lives in the node's
``context.state`` between rounds.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtreelora.engines.flower.node import client_id, node_client, node_info
from fedtreelora.engines.flower.records import from_array_record, to_array_record
from fedtreelora.engines.flower.settings import FlowerRunSettings
from fedtreelora.engines.setup import client_seed
from fedtreelora.train import run_client_round

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


@app.train()
def train(msg: Message, context: Context) -> Message:
    settings = FlowerRunSettings.from_run_config(context.run_config)
    cfg = msg.content["config"]
    node = node_client(settings.experiment, context.node_config, list(cfg["label-names"]))
    rnd = int(cfg["round"])
    _settle(context, bool(cfg["accepted"]))
    fed = node.fed
    phase = fed.strategy.phase(rnd)
    if phase.name != str(cfg["phase"]):
        raise ValueError(
            f"round {rnd + 1}: the server is in phase {cfg['phase']!r} but this node computes {phase.name!r}; "
            "server and nodes must run the same fedtreelora version and experiment config"
        )
    committed = context.state.get(COMMITTED)
    state = from_array_record(committed) if isinstance(committed, ArrayRecord) else dict(fed.initial_state)
    result = run_client_round(
        fed.bank,
        fed.classifier.tokenizer,
        state=state,
        payload=from_array_record(msg.content.get("payload")),
        upload_keys=list(cfg["upload-keys"]),
        train_data=fed.train_data[node.index],
        val_data=fed.val_data[node.index],
        seed=client_seed(settings.experiment.seed, rnd, node.client),
        phase=phase,
        settings=fed.settings,
        device=fed.device,
    )
    context.state[PENDING] = to_array_record(result.state)
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    metrics["client"] = node.client
    return Message(
        RecordDict({"upload": to_array_record(result.upload), "metrics": MetricRecord(metrics)}), reply_to=msg
    )
