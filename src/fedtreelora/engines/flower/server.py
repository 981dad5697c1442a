"""The server side on Flower: the in-process engine's rounds, with clients reached through a Grid.

:class:`FlowerEngine` reuses :class:`~fedtreelora.engines.simulation.SimulationEngine` whole (participant
sampling, payloads, update validation, aggregation, metrics, summary, report); only how a round's
clients are reached differs (:class:`FlowerRunner`): each chosen client's payload goes to its node as a
Flower ``train`` message and the upload comes back. The server builds the model side only (adapter
shapes, strategy, a :class:`~fedtreelora.engines.setup.FederationView`); it never sees data.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from rich.console import Console

from fedtreelora.adapters import PhaseSpec
from fedtreelora.config import ExperimentConfig
from fedtreelora.data import configured_dataset_name, planted_groups
from fedtreelora.engines.flower.phases import phase_config
from fedtreelora.engines.flower.records import from_array_record, to_array_record
from fedtreelora.engines.flower.secure import instructions, secure_round, secure_sum
from fedtreelora.engines.flower.slots import Slots, clipping_range, cluster_means, local_steps, masked_bytes
from fedtreelora.engines.runners import ClientRunner, Tensors
from fedtreelora.engines.setup import (
    FederationView,
    ModelSide,
    RunTask,
    build_model_side,
    group_records,
    membership_of,
)
from fedtreelora.engines.simulation import SimulationEngine
from fedtreelora.train import ClientResult


@dataclass
class ServerFederation(ModelSide, RunTask):
    """What the server knows of a federation whose clients live on Flower nodes: the model side
    (backbone, adapters, strategy) and what each node reported.

    A :class:`~fedtreelora.engines.setup.FederationView`, as the in-process
    :class:`~fedtreelora.engines.setup.Federation` is; ``nodes`` maps client id -> Flower node id.
    """

    config: ExperimentConfig
    infos: list[dict[str, Any]]
    nodes: dict[int, int]
    label_names: list[str]
    dataset_name: str = ""
    accepted: dict[int, bool] = field(default_factory=dict)
    """client -> whether the server accepted its last upload (its node commits the state it came with)."""
    answered: dict[int, bool] = field(default_factory=dict)
    """client -> whether its node answered the last message sent to it."""

    @property
    def num_clients(self) -> int:
        return len(self.infos)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def _counts(self, info: dict[str, Any], key: str) -> list[int]:
        """A node's label counts in the federation's label order."""
        counts = dict(zip(info["label-names"], info[key], strict=True))
        return [int(counts.get(name, 0)) for name in self.label_names]

    @property
    def label_counts(self) -> list[list[int]]:
        return [self._counts(i, "train-label-counts") for i in self.infos]

    def client_categories(self) -> list[str] | None:
        """Generation: each client's category (that of the task it holds most examples of), as its
        node reported it; None for classification."""
        if self.task != "generation":
            return None
        out = []
        for info in self.infos:
            counts = list(info["train-label-counts"])
            categories = list(info.get("task-categories") or info["label-names"])
            out.append(str(categories[counts.index(max(counts))]) if counts else "")
        return out

    def partition_record(self) -> dict[str, Any]:
        planted = planted_groups(self.config.data)
        return {
            "dataset": self.dataset_name,
            "label_names": self.label_names,
            **(
                {"task": "generation", "client_categories": self.client_categories()}
                if self.task == "generation"
                else {}
            ),
            "dirichlet_alpha": self.config.data.dirichlet_alpha,
            "seed": self.config.seed,
            **({} if planted is None else {"groups": group_records(self.config)}),
            "clients": [
                {
                    "client": i["client"],
                    **({} if planted is None else {"group": planted[i["client"]]}),
                    "node": self.nodes.get(i["client"]),
                    "train_label_counts": self._counts(i, "train-label-counts"),
                    "val_label_counts": self._counts(i, "val-label-counts"),
                }
                for i in self.infos
            ],
        }


def _query(grid: Grid, node_ids: list[int], config: dict[str, Any], timeout: float | None) -> list[Message]:
    messages = [
        Message(RecordDict({"config": ConfigRecord(config)}), dst_node_id=n, message_type=MessageType.QUERY)
        for n in node_ids
    ]
    return list(grid.send_and_receive(messages, timeout=timeout))


class FlowerEngine(SimulationEngine):
    """Runs a federation whose clients are Flower nodes, from a ServerApp's ``Grid``.

    Args:
        config: the experiment (its ``data.num_clients`` nodes must connect).
        grid: the ServerApp's grid.
        out_dir: where outputs go (as for the in-process engine), or None.
        round_timeout: seconds to wait for a round's replies (None: wait for all); late clients miss
            the round and keep their state.
        node_wait_timeout: seconds to wait at start for every client's node.
        collect_states: fetch every client's final personal adapters at the end (for ``export``).
    """

    secure_aggregation = True

    def __init__(
        self,
        config: ExperimentConfig,
        grid: Grid,
        out_dir: str | Path | None = None,
        *,
        round_timeout: float | None = None,
        node_wait_timeout: float = 120.0,
        collect_states: bool = True,
        **kwargs: Any,
    ) -> None:
        # Client states live on the nodes, so a server checkpoint could not restore them: resume is
        # an in-process feature.
        config = config.model_copy(update={"federation": config.federation.model_copy(update={"checkpoint_every": 0})})
        super().__init__(config, out_dir, **kwargs)
        self.grid = grid
        self.round_timeout = round_timeout
        self.node_wait_timeout = node_wait_timeout
        self.collect_states = collect_states

    # --- setup: who is out there ---------------------------------------------------------------------
    def _gather(
        self, needed: Sequence[int], known: Mapping[int, int], what: str
    ) -> dict[int, tuple[int, dict[str, Any]]]:
        """Wait (``node_wait_timeout``) until the nodes of every client in ``needed`` have connected;
        ask every node not in ``known`` (client -> node) for its client and counts.

        Returns:
            client -> (node id, its info), for every newly seen node (``needed`` ones and any other).
        Raises:
            TimeoutError naming the missing clients and ``what`` they were awaited for; ValueError when
            two nodes claim one client.
        """
        deadline = time.monotonic() + self.node_wait_timeout
        seen_nodes = set(known.values())
        found: dict[int, tuple[int, dict[str, Any]]] = {}
        while True:
            new = sorted(set(self.grid.get_node_ids()) - seen_nodes)
            if new:
                for reply in _query(self.grid, new, {"action": "info"}, self.node_wait_timeout):
                    node = reply.metadata.src_node_id
                    if reply.has_error():
                        raise RuntimeError(f"node {node} failed to start: {reply.error.reason}")
                    info: dict[str, Any] = dict(reply.content["info"])
                    client = int(info["client"])
                    other = known.get(client, found.get(client, (None, None))[0])
                    if other is not None:
                        raise ValueError(
                            f"nodes {other} and {node} both claim client {client}; "
                            "give every SuperNode its own --node-config client-id"
                        )
                    found[client] = node, info
                    seen_nodes.add(node)
            missing = sorted(set(needed) - set(known) - set(found))
            if not missing:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no node connected for clients {missing} within {self.node_wait_timeout:.0f} s ({what}); "
                    "start their SuperNodes, or change federation.join / data.num_clients"
                )
            time.sleep(0.5)

    def _round(self, fed: Any, runner: Any, rnd: int, run: Any, tick: Callable[[], None]) -> dict[str, Any]:
        """Take in the nodes of clients that join this round (``federation.join``), then run the round."""
        if isinstance(fed, ServerFederation):
            self._admit(fed, rnd)
        return super()._round(fed, runner, rnd, run, tick)

    def _admit(self, fed: ServerFederation, rnd: int) -> None:
        """Wait for the node of every client in the federation in round ``rnd`` whose node has not
        connected yet (a client that joins late), and record its counts: the partition, ``nodes.json``
        and the strategy's example counts are brought up to date."""
        present = fed.strategy.context.present(rnd)
        waiting = [k for k in present if k not in fed.nodes]
        if not waiting:
            return
        found = self._gather(waiting, fed.nodes, f"joining at round {rnd + 1}")
        for client, (node, info) in sorted(found.items()):
            if not 0 <= client < fed.num_clients:
                raise ValueError(f"node {node} runs client {client}, outside data.num_clients={fed.num_clients}")
            unknown = sorted(set(info["label-names"]) - set(fed.label_names))
            if unknown:
                raise ValueError(
                    f"client {client} joins at round {rnd + 1} with labels {unknown} that no client had at the "
                    f"start (the head has {fed.label_names}); a late site must hold labels the federation knows"
                )
            fed.infos[client], fed.nodes[client] = info, node
        context = fed.strategy.context
        fed.strategy.context = replace(context, num_examples=tuple(int(i["num-train"]) for i in fed.infos))
        if self.recorder.folder is not None:
            self.recorder.folder.write_nodes(fed.nodes)
        self.recorder.write_partition(fed.partition_record())

    def _wait_for_nodes(self, count: int) -> list[int]:
        deadline = time.monotonic() + self.node_wait_timeout
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= count:
                return nodes
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(nodes)} of data.num_clients={count} nodes connected within "
                    f"{self.node_wait_timeout:.0f} s; start the missing SuperNodes or lower data.num_clients"
                )
            time.sleep(0.5)

    def setup(self) -> tuple[FederationView, ClientRunner]:
        """The model side, built once every client's node has answered, and a runner that reaches the
        nodes."""
        fed = self._connect()
        runner = FlowerRunner(
            fed,
            self.grid,
            self.console,
            round_timeout=self.round_timeout,
            node_wait_timeout=self.node_wait_timeout,
            collect_states=self.collect_states,
        )
        return fed, runner

    def _connect(self) -> ServerFederation:
        """Wait for every client's node, ask each for its counts, and build the model side."""
        cfg = self.config
        count = cfg.data.num_clients
        membership = membership_of(cfg, count)
        infos: dict[int, dict[str, Any]] = {}
        nodes: dict[int, int] = {}
        if membership.changes:
            # A client that joins late (federation.join) may connect later: its node is awaited before its round.
            found = self._gather(membership.present(0), {}, "at the start")
            nodes = {k: node for k, (node, _) in found.items()}
            infos = {k: info for k, (_, info) in found.items()}
        else:
            node_ids = self._wait_for_nodes(count)
            replies = _query(self.grid, node_ids, {"action": "info"}, self.node_wait_timeout)
            for reply in replies:
                if reply.has_error():
                    raise RuntimeError(f"node {reply.metadata.src_node_id} failed to start: {reply.error.reason}")
                info: dict[str, Any] = dict(reply.content["info"])
                client = int(info["client"])
                if client in nodes:
                    raise ValueError(
                        f"nodes {nodes[client]} and {reply.metadata.src_node_id} both claim client {client}; "
                        "give every SuperNode its own --node-config client-id"
                    )
                infos[client], nodes[client] = info, reply.metadata.src_node_id
        missing = sorted(set(range(count)) - set(infos) - {k for k in range(count) if membership.joins(k) > 0})
        if missing:
            raise ValueError(f"no node answered for clients {missing} (data.num_clients={count})")
        vocabularies = {tuple(i["label-names"]) for i in infos.values()}
        # Sites holding different subsets of the labels agree on their sorted union.
        labels = list(vocabularies.pop()) if len(vocabularies) == 1 else sorted(set().union(*vocabularies))
        # A late client's counts are not known before its node connects: none until then.
        absent = {"label-names": labels, "num-train": 0, "train-label-counts": [0] * len(labels)}
        absent["val-label-counts"] = [0] * len(labels)
        ordered = [infos.get(c, {**absent, "client": c}) for c in range(count)]
        side = build_model_side(
            cfg,
            num_labels=len(labels),
            num_examples=tuple(int(i["num-train"]) for i in ordered),
            num_slots=1,
        )
        model_side = {f.name: getattr(side, f.name) for f in fields(ModelSide)}
        fed = ServerFederation(
            **model_side,
            config=cfg,
            infos=ordered,
            nodes=nodes,
            label_names=labels,
            dataset_name=configured_dataset_name(cfg.data),
        )
        if self.recorder.folder is not None:
            self.recorder.folder.write_nodes(nodes)
        return fed


class FlowerRunner:
    """Clients on Flower nodes, reached through a ServerApp's ``Grid``: a ``train`` message per chosen
    client, an ``evaluate`` message per client each round (chosen or not; see :meth:`evaluate_received`),
    and a ``finish`` query per node at the end.

    Args:
        fed: the server's view of the federation (which node holds which client; it records who
            answered and whose upload counted).
        grid: the ServerApp's grid.
        console: where a failed or missing reply is reported.
        round_timeout: seconds to wait for a round's replies (None: wait for all).
        node_wait_timeout: seconds to wait for the final replies when ``round_timeout`` is None.
        collect_states: fetch every client's final personal adapters at the end.
    """

    def __init__(
        self,
        fed: ServerFederation,
        grid: Grid,
        console: Console,
        *,
        round_timeout: float | None,
        node_wait_timeout: float,
        collect_states: bool,
    ) -> None:
        self.fed = fed
        self.grid = grid
        self.console = console
        self.round_timeout = round_timeout
        self.node_wait_timeout = node_wait_timeout
        self.collect_states = collect_states

    def train(
        self,
        rnd: int,
        phase: PhaseSpec,
        payloads: Mapping[int, Tensors],
        upload_keys: Mapping[int, list[str]],
        states: Sequence[Tensors],
        tick: Callable[[], None],
    ) -> dict[int, ClientResult]:
        """Each chosen client trains on its node; a result's ``state`` is empty (the node keeps it).

        With ``privacy.secure_aggregation`` (outside a clustering method's warm-up), the uploads are
        summed by SecAgg+ and a result's ``upload`` is the client's cluster mean (:mod:`.secure`)."""
        fed = self.fed
        chosen = list(payloads)
        configs = {
            k: {
                "round": rnd,
                **phase_config(phase),
                "accepted": fed.accepted.get(k, False),
                "upload-keys": list(upload_keys[k]),
                "label-names": fed.label_names,
            }
            for k in chosen
        }
        if fed.config.privacy.secure_aggregation and secure_round(fed.strategy, rnd):
            return self._train_secure(rnd, configs, payloads, upload_keys, tick)
        messages = []
        for k in chosen:
            config: dict[str, Any] = {**configs[k], "secure": False}
            content = RecordDict({"config": ConfigRecord(config), "payload": to_array_record(payloads[k])})
            messages.append(Message(content, dst_node_id=fed.nodes[k], message_type=MessageType.TRAIN))
        results: dict[int, ClientResult] = {}
        for k, (reply, metrics) in self._exchange(messages, chosen, f"round {rnd + 1}: client {{}} failed").items():
            upload = from_array_record(reply.content.array_records.get("upload"))
            results[k] = ClientResult(state={}, upload=upload, metrics=metrics)
            tick()
        for k in sorted(set(chosen) - set(results)):
            self.console.print(f"[yellow]round {rnd + 1}: no reply from client {k} in time; it keeps its state[/]")
        return results

    def _train_secure(
        self,
        rnd: int,
        configs: Mapping[int, dict[str, Any]],
        payloads: Mapping[int, Tensors],
        upload_keys: Mapping[int, list[str]],
        tick: Callable[[], None],
    ) -> dict[int, ClientResult]:
        """One round through SecAgg+: each chosen client's slots, the secure sum, then each contributing
        client's cluster mean as its result's upload. A client without a cluster (it missed the warm-up
        the tree was built from) sits the round out: it could be placed only by its individual upload."""
        fed = self.fed
        strategy = fed.strategy
        labels = strategy.sharing_labels()
        assert labels is not None  # secure rounds come after the clusters exist
        homeless = [k for k in configs if any(labels[strategy.site_of(key).layer, k] < 0 for key in upload_keys[k])]
        for k in homeless:
            self.console.print(
                f"[yellow]round {rnd + 1}: client {k} has no cluster (it missed warm-up) and, under "
                "privacy.secure_aggregation, cannot be placed; it sits the round out[/]"
            )
        chosen = [k for k in configs if k not in homeless and self._alive(k)]
        if not chosen:
            return {}
        weights = strategy.weights(chosen, strategy.options.weighting)
        relative = np.ones(len(chosen)) if weights is None else weights / weights.max()
        clip = self._clipping_range([payloads[k] for k in chosen], chosen)
        slots: dict[int, Slots] = {}
        for i, k in enumerate(chosen):
            layers = [strategy.site_of(key).layer for key in upload_keys[k]]
            slots[k] = Slots(
                keys=tuple(upload_keys[k]),
                slot=tuple(int(labels[layer, k]) for layer in layers),
                clusters=tuple(int(labels[layer].max()) + 1 for layer in layers),
                weight=float(relative[i]),
                clipping_range=clip,
            )
        fitins = {fed.nodes[k]: instructions({**configs[k], "secure": True}, payloads[k], slots[k]) for k in chosen}
        privacy = fed.config.privacy
        summed = secure_sum(self.grid, rnd, fitins, privacy, self.round_timeout)
        client_of = {n: k for k, n in fed.nodes.items()}
        contributed = {client_of[node]: metrics for node, metrics in summed.metrics.items()}
        for k in chosen:
            fed.answered[k] = k in contributed
        if not contributed:
            self.console.print(f"[yellow]round {rnd + 1}: secure aggregation halted (too few nodes); no update[/]")
            return {}
        shapes = fed.bank.state_shapes()
        means = cluster_means(
            summed.total, {k: slots[k] for k in contributed}, shapes, privacy.secure_quantization_range
        )
        clipped = sum(int(m.get("secure_clipped", 0)) for m in contributed.values())
        if clipped:
            self.console.print(
                f"[yellow]round {rnd + 1}: {clipped} uploaded values lay outside SecAgg+'s clipping range "
                f"{clip:.3g} and were clipped; raise privacy.secure_clipping_range[/]"
            )
        results: dict[int, ClientResult] = {}
        for k, metrics in sorted(contributed.items()):
            metrics.pop("client", None)
            metrics.update(
                {
                    "uplink_bytes": masked_bytes(slots[k], shapes),
                    "secure_clipping_range": clip,
                    "secure_step": 2 * clip / privacy.secure_quantization_range,
                }
            )
            results[k] = ClientResult(state={}, upload=means[k], metrics=metrics)
            tick()
        for k in sorted(set(chosen) - set(results)):
            self.console.print(f"[yellow]round {rnd + 1}: no masked vector from client {k}; it keeps its state[/]")
        return results

    def _alive(self, client: int) -> bool:
        """Whether ``client``'s node may take part in SecAgg+: it answered its last message, or answers an
        ``info`` query now. Flower's SecAgg+ (1.42) loses the whole round when a sampled node never answers
        its first stage, so a node that went silent is asked first, and left out if it stays silent."""
        fed = self.fed
        if fed.answered.get(client, True):
            return True
        timeout = self.round_timeout or self.node_wait_timeout
        alive = any(not r.has_error() for r in _query(self.grid, [fed.nodes[client]], {"action": "info"}, timeout))
        fed.answered[client] = alive
        if not alive:
            self.console.print(f"[yellow]client {client}'s node does not answer; it sits out this secure round[/]")
        return alive

    def _clipping_range(self, payloads: Sequence[Tensors], clients: Sequence[int]) -> float:
        """SecAgg+'s clipping range for a round whose ``clients`` start from ``payloads``
        (:func:`~fedtreelora.engines.flower.secure.clipping_range`)."""
        fed = self.fed
        cfg = fed.config
        steps = max(local_steps(cfg, int(fed.infos[k]["num-train"])) for k in clients)
        bound = max(1.0 / math.sqrt(site.d_in) for site in fed.bank.sites)
        noise = 0.0
        if cfg.privacy.enabled:
            from fedtreelora.privacy import privacy_settings

            dp = privacy_settings(cfg)
            assert dp is not None
            noise = dp.noise_multiplier * dp.clip_norm
        return clipping_range(cfg.privacy, payloads, bound, cfg.train.lr, steps, noise)

    def evaluate_received(
        self, rnd: int, phase: PhaseSpec, payloads: Mapping[int, Tensors], states: Sequence[Tensors]
    ) -> dict[int, dict[str, Any]]:
        """Each client scores what it receives on its node: an ``evaluate`` message with the payload of
        round ``rnd + 1`` (the node first commits the state whose upload was just accepted, or drops one
        the server did not accept). A client whose node did not answer its last message is not asked
        (it may be gone); it is scored again once it answers a training message."""
        fed = self.fed
        clients = [k for k in payloads if fed.answered.get(k, True)]
        messages = []
        for k in clients:
            config: dict[str, Any] = {
                "round": rnd,
                **phase_config(phase),
                "accepted": fed.accepted.get(k, False),
                "label-names": fed.label_names,
            }
            content = RecordDict({"config": ConfigRecord(config), "payload": to_array_record(payloads[k])})
            messages.append(Message(content, dst_node_id=fed.nodes[k], message_type=MessageType.EVALUATE))
        replies = self._exchange(messages, clients, f"round {rnd + 1}: client {{}} failed to evaluate")
        return {k: metrics for k, (_, metrics) in replies.items()}

    def settle(self, chosen: Sequence[int], accepted: Sequence[int]) -> None:
        """A node commits its pending state only when the server accepted the upload it came with; the
        next message to it says so."""
        kept = set(accepted)
        for k in chosen:
            self.fed.accepted[k] = k in kept

    def finish(self) -> dict[int, Tensors]:
        """Tell every node whether its last upload counted; collect final states if asked.

        A node that did not answer its last message is skipped (it may be gone); it never commits the
        state of an upload the server did not accept, so it stays as it was.
        """
        fed = self.fed
        order = [k for k in sorted(fed.nodes) if fed.answered.get(k, True)]
        messages = [
            Message(
                RecordDict({"config": ConfigRecord({
                    "action": "finish", "accepted": fed.accepted.get(k, False), "send-state": self.collect_states,
                })}),
                dst_node_id=fed.nodes[k],
                message_type=MessageType.QUERY,
            )
            for k in order
        ]  # fmt: skip
        client_of = {n: k for k, n in fed.nodes.items()}
        states: dict[int, Tensors] = {}
        for reply in self.grid.send_and_receive(messages, timeout=self.round_timeout or self.node_wait_timeout):
            k = client_of.get(reply.metadata.src_node_id)
            if k is None or reply.has_error():
                continue
            if self.collect_states and "state" in reply.content:
                states[k] = from_array_record(reply.content.array_records["state"])
        return states

    def _exchange(
        self, messages: list[Message], clients: list[int], failure: str
    ) -> dict[int, tuple[Message, dict[str, Any]]]:
        """Send ``messages`` (one per client of ``clients``) and collect each answering client's reply and
        its scalar metrics; a failed reply is reported (``failure`` formatted with the client) and left
        out. Records which clients answered."""
        fed = self.fed
        client_of = {n: k for k, n in fed.nodes.items()}
        out: dict[int, tuple[Message, dict[str, Any]]] = {}
        for reply in self.grid.send_and_receive(messages, timeout=self.round_timeout):
            k = client_of.get(reply.metadata.src_node_id)
            if k is None:
                continue
            if reply.has_error():
                self.console.print(f"[yellow]{failure.format(k)}: {reply.error.reason}[/]")
                continue
            metrics = dict(reply.content["metrics"])
            metrics.pop("client", None)
            out[k] = reply, metrics
        for k in clients:
            fed.answered[k] = k in out
        return out
