"""Client runners: how an engine's round reaches its clients.

The engine's round (participant sampling, payloads, update validation, aggregation, metrics) is the
same wherever the clients live; a :class:`ClientRunner` is the part that differs. In one process the
clients are adapter states swapped into the model's slots, one client per pass
(:class:`InProcessRunner`) or several (:class:`VectorizedRunner`, ``train.clients_per_pass``); on
Flower they are nodes reached by messages (:class:`~fedtreelora.engines.flower.server.FlowerRunner`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch

from fedtreelora.adapters import PhaseSpec
from fedtreelora.engines.setup import Federation, client_seed
from fedtreelora.train import ClientResult, run_client_round, run_clients_round
from fedtreelora.train.received import evaluate_received, evaluate_received_together

Tensors = dict[str, torch.Tensor]


class ClientRunner(Protocol):
    """What an engine needs from "the clients" each round."""

    def train(
        self,
        rnd: int,
        phase: PhaseSpec,
        payloads: Mapping[int, Tensors],
        upload_keys: Mapping[int, list[str]],
        states: Sequence[Tensors],
        tick: Callable[[], None],
    ) -> dict[int, ClientResult]:
        """Round ``rnd``'s local training of the clients in ``payloads`` (keys in ascending order).

        Args:
            phase: the round's phase.
            payloads: client -> what the server sends it.
            upload_keys: client -> the state keys it uploads.
            states: every client's state as the engine holds it (index: client id).
            tick: called once per client that finished.
        Returns:
            client -> its result, for the clients that answered (a remote client may not).
        """
        ...

    def evaluate_received(
        self, rnd: int, phase: PhaseSpec, payloads: Mapping[int, Tensors], states: Sequence[Tensors]
    ) -> dict[int, dict[str, Any]]:
        """After round ``rnd``'s aggregation, the scores of what each client in ``payloads`` receives: its
        kept state plus its payload for the next round, in that round's ``phase``; scored with round
        ``rnd``'s client seeds.

        Returns:
            client -> its scores, for the clients that answered.
        """
        ...

    def settle(self, chosen: Sequence[int], accepted: Sequence[int]) -> None:
        """The server's verdict on the round: of the ``chosen`` clients, the uploads of ``accepted`` ones
        counted (a client whose state lives elsewhere keeps the new state only then)."""
        ...

    def finish(self) -> dict[int, Tensors]:
        """After the last round: the final states of clients whose states the engine does not hold
        (client -> state; empty when every state is already the engine's)."""
        ...


class InProcessRunner:
    """Clients in this process, one at a time: each client's state is written into the model's adapter
    slot 0, trained or scored, and read back (:func:`~fedtreelora.train.run_client_round`). A round's
    clients train and are scored on their data of that round (:meth:`Federation.client_data`, which
    follows a group's ``drift``)."""

    def __init__(self, fed: Federation) -> None:
        self.fed = fed

    def passes(self, clients: Sequence[int], phase: PhaseSpec) -> list[list[int]]:
        """Clients grouped into passes over the model, in the order they run: here one client each."""
        return [[k] for k in clients]

    def train(
        self,
        rnd: int,
        phase: PhaseSpec,
        payloads: Mapping[int, Tensors],
        upload_keys: Mapping[int, list[str]],
        states: Sequence[Tensors],
        tick: Callable[[], None],
    ) -> dict[int, ClientResult]:
        fed = self.fed
        results: dict[int, ClientResult] = {}
        for group in self.passes(list(payloads), phase):
            seeds = [client_seed(fed.config.seed, rnd, k) for k in group]
            data = [fed.client_data(rnd, k) for k in group]
            if len(group) == 1:
                (k,) = group
                out = [
                    run_client_round(
                        fed.bank, fed.classifier.tokenizer, state=states[k], payload=payloads[k],
                        upload_keys=upload_keys[k], train_data=data[0][0], val_data=data[0][1],
                        seed=seeds[0], phase=phase, settings=fed.settings, device=fed.device, client=k, rnd=rnd,
                        upload_transforms=fed.upload_transforms,
                    )
                ]  # fmt: skip
            else:
                out = run_clients_round(
                    fed.bank, fed.classifier.tokenizer, states=[states[k] for k in group],
                    payloads=[payloads[k] for k in group], upload_keys=[upload_keys[k] for k in group],
                    train_data=[t for t, _ in data], val_data=[v for _, v in data],
                    seeds=seeds, phase=phase, settings=fed.settings, device=fed.device, clients=group, rnd=rnd,
                    upload_transforms=fed.upload_transforms,
                )  # fmt: skip
            for k, result in zip(group, out, strict=True):
                results[k] = result
                tick()
        return results

    def evaluate_received(
        self, rnd: int, phase: PhaseSpec, payloads: Mapping[int, Tensors], states: Sequence[Tensors]
    ) -> dict[int, dict[str, Any]]:
        fed = self.fed
        tokenizer = fed.classifier.tokenizer
        scores: dict[int, dict[str, Any]] = {}
        for group in self.passes(list(payloads), phase):
            seeds = [client_seed(fed.config.seed, rnd, k) for k in group]
            data = [fed.client_data(rnd, k) for k in group]
            if len(group) == 1:
                (k,) = group
                scores[k] = evaluate_received(
                    fed.bank, tokenizer, state=states[k], payload=payloads[k], train_data=data[0][0],
                    val_data=data[0][1], seed=seeds[0], phase=phase, settings=fed.settings, device=fed.device,
                )  # fmt: skip
                continue
            out = evaluate_received_together(
                fed.bank, tokenizer, states=[states[k] for k in group], payloads=[payloads[k] for k in group],
                val_data=[v for _, v in data], seeds=seeds, phase=phase, settings=fed.settings,
                device=fed.device,
            )  # fmt: skip
            scores.update(zip(group, out, strict=True))
        return scores

    def settle(self, chosen: Sequence[int], accepted: Sequence[int]) -> None:
        """Nothing to do: the engine keeps an accepted client's new state itself."""

    def finish(self) -> dict[int, Tensors]:
        """Nothing to collect: every client's state is already the engine's."""
        return {}


class VectorizedRunner(InProcessRunner):
    """Clients in this process, up to ``train.clients_per_pass`` per pass: client j of a pass in adapter
    slot j (:func:`~fedtreelora.train.run_clients_round`); a pass of one runs as :class:`InProcessRunner`
    does, bit for bit."""

    def passes(self, clients: Sequence[int], phase: PhaseSpec) -> list[list[int]]:
        """Up to ``bank.num_slots`` clients per pass, members of a pass holding equal numbers of training
        and validation examples; one client each under a phase with its own evaluation (FedDPA's
        instance-wise weights)."""
        if phase.evaluate is not None:
            return [[k] for k in clients]
        fed = self.fed
        size = fed.bank.num_slots
        by_shape: dict[tuple[int, int], list[int]] = {}
        for k in clients:
            by_shape.setdefault((len(fed.train_data[k]), len(fed.val_data[k])), []).append(k)
        groups = [members[i : i + size] for members in by_shape.values() for i in range(0, len(members), size)]
        return sorted(groups)


def in_process_runner(fed: Federation) -> InProcessRunner:
    """The runner for a federation built in this process: vectorised when its adapter bank has more
    than one slot (``train.clients_per_pass``), else one client at a time."""
    return VectorizedRunner(fed) if fed.bank.num_slots > 1 else InProcessRunner(fed)
