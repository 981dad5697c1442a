"""A client's upload is cut in one place (``fedtreelora.train.upload``) however the client trains (alone,
in a vectorised pass, on a Flower node), and the run's chain of upload transforms shapes what the server
receives without touching what the client keeps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fedtreelora.config import load_config
from fedtreelora.engines import SimulationEngine, build_federation
from fedtreelora.engines.setup import Federation, client_seed
from fedtreelora.train import (
    ClientResult,
    UploadContext,
    client_upload,
    run_client_round,
    run_clients_round,
)

Tensors = dict[str, torch.Tensor]


class Recorder:
    """An upload transform that changes nothing and keeps every context it was called with."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], UploadContext]] = []

    def __call__(self, upload: Tensors, context: UploadContext) -> Tensors:
        self.calls.append((list(upload), context))
        return upload


class Zero:
    """An upload transform that sends zeros in place of one tensor."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __call__(self, upload: Tensors, context: UploadContext) -> Tensors:
        return {k: torch.zeros_like(v) if k == self.key else v for k, v in upload.items()}


# --- the function alone -------------------------------------------------------------------------------------------
def _tensors(seed: int) -> Tensors:
    g = torch.Generator().manual_seed(seed)
    return {"m.cluster.lora_A": torch.randn(2, 5, generator=g), "m.cluster.lora_B": torch.randn(4, 2, generator=g),
            "m.mix_logit": torch.randn((), generator=g)}  # fmt: skip


def test_without_transforms_the_upload_is_the_states_own_tensors() -> None:
    state, start = _tensors(0), _tensors(1)
    upload = client_upload(state, start, ["m.cluster.lora_B", "m.cluster.lora_A"])
    assert list(upload) == ["m.cluster.lora_B", "m.cluster.lora_A"]
    assert all(upload[k] is state[k] for k in upload), "no copy, no arithmetic: the bits the state holds"


def test_the_chain_runs_in_order_and_sees_the_round_and_the_received_start() -> None:
    state, start = _tensors(0), _tensors(1)
    before = {k: v.clone() for k, v in state.items()}
    recorder = Recorder()

    def add_one(upload: Tensors, context: UploadContext) -> Tensors:
        return {k: v + 1 for k, v in upload.items()}

    def double(upload: Tensors, context: UploadContext) -> Tensors:
        return {k: v * 2 for k, v in upload.items()}

    keys = ["m.cluster.lora_A", "m.cluster.lora_B"]
    upload = client_upload(state, start, keys, (add_one, recorder, double), client=3, rnd=5, seed=17)
    for k in keys:
        torch.testing.assert_close(upload[k], (state[k] + 1) * 2, rtol=0, atol=0)  # add_one, then double
        assert state[k].equal(before[k]), "the kept state is not touched"
    ((seen, context),) = recorder.calls
    assert seen == keys
    assert (context.client, context.round, context.seed) == (3, 5, 17)
    assert context.start is start and context.state is state


def test_the_context_gives_the_update_from_the_received_start() -> None:
    state, start = _tensors(0), _tensors(1)
    context = UploadContext(client=0, round=0, seed=0, start=start, state=state)
    upload = {k: state[k] for k in ("m.cluster.lora_A", "m.mix_logit")}
    delta = context.delta(upload)
    assert delta.keys() == upload.keys()
    for k in upload:
        assert delta[k].equal(state[k] - start[k])
        torch.testing.assert_close(context.from_delta(delta)[k], state[k])

    def halve_the_update(upload: Tensors, context: UploadContext) -> Tensors:  # a clipping transform's shape
        return context.from_delta({k: d / 2 for k, d in context.delta(upload).items()})

    halved = client_upload(state, start, list(upload), (halve_the_update,))
    for k in upload:
        torch.testing.assert_close(halved[k], (state[k] + start[k]) / 2)


# --- every way a client trains ------------------------------------------------------------------------------------
K = 3
RND = 1  # a federated round of fedtreelora: the cluster expert trains beside a frozen external expert


@pytest.fixture(scope="module")
def fed() -> Federation:
    """MiniLM cut to 1 layer, 3 clients of 16 training examples, room for all of them in one pass."""
    config = load_config(
        overrides=[
            "method=fedtreelora",
            "model.num_layers=1",
            "model.max_length=16",
            f"data.num_clients={K}",
            "data.n_train=16",
            "data.n_val=8",
            "train.batch_size=8",
            "train.eval_batch_size=8",
            f"train.clients_per_pass={K}",
            "fedtreelora.warmup_rounds=1",
        ]
    )
    return build_federation(config)


def _round_inputs(fed: Federation) -> tuple[list[Tensors], list[Tensors], list[list[str]], list[int]]:
    """Distinct states and payloads per client, each client's upload keys and round seed."""
    g = torch.Generator().manual_seed(0)
    states = [{k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in fed.initial_state.items()} for _ in range(K)]
    payloads = [
        {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in fed.initial_state.items() if ".cluster." in k}
        for _ in range(K)
    ]
    keys = [list(fed.strategy.upload_keys(RND, k)) for k in range(K)]
    seeds = [client_seed(fed.config.seed, RND, k) for k in range(K)]
    return states, payloads, keys, seeds


def _rounds(fed: Federation, clients: Sequence[int], transforms: tuple, *, together: bool) -> list[ClientResult]:
    states, payloads, keys, seeds = _round_inputs(fed)
    common = {"phase": fed.strategy.phase(RND), "settings": fed.settings, "device": fed.device, "rnd": RND,
              "upload_transforms": transforms}  # fmt: skip
    if together:
        return run_clients_round(
            fed.bank, fed.classifier.tokenizer, states=[states[k] for k in clients],
            payloads=[payloads[k] for k in clients], upload_keys=[keys[k] for k in clients],
            train_data=[fed.train_data[k] for k in clients], val_data=[fed.val_data[k] for k in clients],
            seeds=[seeds[k] for k in clients], clients=list(clients), **common,
        )  # fmt: skip
    return [
        run_client_round(
            fed.bank, fed.classifier.tokenizer, state=states[k], payload=payloads[k], upload_keys=keys[k],
            train_data=fed.train_data[k], val_data=fed.val_data[k], seed=seeds[k], client=k, **common,
        )
        for k in clients
    ]  # fmt: skip


@pytest.mark.slow
def test_alone_and_together_a_round_uploads_what_the_one_function_cuts(fed: Federation) -> None:
    states, payloads, keys, seeds = _round_inputs(fed)
    zeroed = keys[0][1]  # a lora_B of the cluster expert
    assert zeroed.endswith(".cluster.lora_B")
    paths: dict[str, list[ClientResult]] = {}
    recorders: dict[str, Recorder] = {}
    plain: dict[str, list[ClientResult]] = {}
    for name, together, clients in (("alone", False, [0, 1, 2]), ("one pass", True, [0, 1, 2]),
                                    ("passes of one", True, None)):  # fmt: skip
        recorders[name] = Recorder()
        chain = (recorders[name], Zero(zeroed))
        if clients is None:  # a vectorised pass holding a single client, client by client
            paths[name] = [_rounds(fed, [k], chain, together=True)[0] for k in range(K)]
            plain[name] = [_rounds(fed, [k], (), together=True)[0] for k in range(K)]
        else:
            paths[name] = _rounds(fed, clients, chain, together=together)
            plain[name] = _rounds(fed, clients, (), together=together)
    for name, results in paths.items():
        calls = recorders[name].calls
        assert [c.client for _, c in calls] == [0, 1, 2] and {c.round for _, c in calls} == {RND}, name
        for k, (result, (seen, context)) in enumerate(zip(results, calls, strict=True)):
            assert seen == keys[k] and context.seed == seeds[k], (name, k)
            start = {**states[k], **payloads[k]}
            assert context.start.keys() == start.keys(), (name, k)
            assert all(context.start[x].equal(start[x]) for x in start), f"{name}: the received start, client {k}"
            # What the round uploaded is, bit for bit, what the one function cuts from its state and start.
            again = client_upload(result.state, start, keys[k], (Zero(zeroed),), client=k, rnd=RND, seed=seeds[k])
            assert result.upload.keys() == again.keys()
            assert all(result.upload[x].equal(again[x]) for x in again), (name, k)
            assert not result.upload[zeroed].any() and result.state[zeroed].abs().max() > 0, "sent zero, kept"
            # Without transforms: the trained state's own tensors, as uploads have always been.
            bare = plain[name][k]
            assert list(bare.upload) == keys[k] and all(bare.upload[x] is bare.state[x] for x in keys[k]), (name, k)
            moved = max(float((bare.state[x] - start[x]).abs().max()) for x in keys[k])
            assert moved > 1e-3, "training moved the uploaded adapters"
    for k in range(K):
        alone, one_pass, single = (paths[name][k] for name in ("alone", "one pass", "passes of one"))
        for x in keys[k]:
            assert single.upload[x].equal(alone.upload[x]), f"a pass of one is one client alone, bit for bit: {x}"
            # clients sharing a pass sum in another order: equal up to float rounding (tests/test_vectorized.py)
            torch.testing.assert_close(one_pass.upload[x], alone.upload[x], rtol=1e-4, atol=5e-5)


class RecordingEngine(SimulationEngine):
    """The in-process engine with an upload chain, keeping every upload as it reaches the server."""

    transforms: tuple = ()

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.received: dict[tuple[int, int], Tensors] = {}

    def build_federation(self) -> Federation:
        self.fed = replace(super().build_federation(), upload_transforms=self.transforms)
        return self.fed

    def tamper(self, rnd: int, client: int, upload: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.received[(rnd, client)] = upload
        return upload


@pytest.mark.slow
@pytest.mark.parametrize("clients_per_pass", [1, 3])
def test_a_transform_in_the_chain_shapes_what_the_server_receives(tmp_path: Path, clients_per_pass: int) -> None:
    """FedIT, 2 rounds, one client at a time or all three in one pass: a transform that zeroes one
    tensor zeroes it in every upload the server sees, and hence in the global adapter it sends back."""
    config = load_config(
        overrides=[
            "method=fedit",
            "model.num_layers=1",
            "model.max_length=16",
            f"data.num_clients={K}",
            "data.n_train=16",
            "data.n_val=8",
            "train.batch_size=8",
            f"train.clients_per_pass={clients_per_pass}",
            "federation.rounds=2",
            "logging.tensorboard=false",
        ]
    )
    plain = RecordingEngine(config, tmp_path / "plain", quiet=True, report=False)
    plain.run()
    keys = sorted(plain.received[(0, 0)])
    zeroed = next(k for k in keys if k.endswith(".lora_B"))
    recorder = Recorder()
    engine = RecordingEngine(config, tmp_path / "zeroed", quiet=True, report=False)
    engine.transforms = (recorder, Zero(zeroed))
    engine.run()
    assert (
        sorted((c.round, c.client) for _, c in recorder.calls)
        == sorted(engine.received)
        == [(r, k) for r in range(2) for k in range(K)]
    )
    for (rnd, k), upload in engine.received.items():
        assert sorted(upload) == keys
        assert not upload[zeroed].any(), (rnd, k)
        assert all(upload[x].abs().max() > 0 for x in keys if x != zeroed), (rnd, k)
        assert plain.received[(rnd, k)][zeroed].abs().max() > 0, "without the chain the tensor is not zero"
    # the server averaged zeros: the global adapter it sends every client holds zeros there
    assert all(not engine.fed.strategy.payload(2, k)[zeroed].any() for k in range(K))
    assert plain.fed.strategy.payload(2, 0)[zeroed].abs().max() > 0
    # the first round starts from the same state either way: the other tensors go up unchanged
    for k in range(K):
        assert all(engine.received[(0, k)][x].equal(plain.received[(0, k)][x]) for x in keys if x != zeroed)
