"""FedTreeLoRA's ``personal`` option: residual experts in the adapter layer (weight 1 outside the mixer),
the phases and wire keys of the strategy, and whole runs where warm-up is bit for bit the paper's method
and only the personal expert, never sent, differs between clients afterwards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fedtreelora.adapters import ExpertSpec, PhaseSpec, Site
from fedtreelora.adapters.layer import MultiClientLoraLinear
from fedtreelora.config import load_config
from fedtreelora.engines import SimulationEngine
from fedtreelora.errors import ConfigError
from fedtreelora.strategies import FederationContext
from fedtreelora.strategies.fedtreelora import FedTreeLoRA, FedTreeLoRAOptions

# --- the layer ---------------------------------------------------------------------------------------------


def layer_with(experts: int, seed: int = 0) -> MultiClientLoraLinear:
    """A 2-slot layer (d_in 5, d_out 3, rank 2) with every A and B random."""
    torch.manual_seed(seed)
    layer = MultiClientLoraLinear(nn.Linear(5, 3), num_slots=2, num_experts=experts, rank=2, alpha=4.0)
    with torch.no_grad():
        for e in range(experts):
            layer.lora_A[e].normal_()
            layer.lora_B[e].normal_()
        layer.mix_logit.copy_(torch.tensor([0.3, -1.2]))
    layer.active_slots = 2
    return layer


def delta(layer: MultiClientLoraLinear, e: int, x: torch.Tensor) -> torch.Tensor:
    """s * B_e A_e x for each slot; x (2, n, d_in) -> (2, n, d_out)."""
    return layer.scaling * torch.einsum("kor,kri,kni->kno", layer.lora_B[e], layer.lora_A[e], x)


@pytest.mark.parametrize("mixer", ["single", "lambda"])
def test_residual_expert_adds_at_weight_one(mixer: str) -> None:
    layer = layer_with(3)
    x = torch.randn(2, 4, 5)
    layer.set_mixer(mixer, residual_experts=1)
    got = layer(x.reshape(8, 5)).reshape(2, 4, 3) - layer.base(x)
    lam = torch.sigmoid(layer.mix_logit).detach()[:, None, None]
    mixed = delta(layer, 0, x) if mixer == "single" else lam * delta(layer, 0, x) + (1 - lam) * delta(layer, 1, x)
    expected = mixed + delta(layer, 2, x)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    # without the residual expert the same layer mixes the three experts and the sum differs
    layer.set_mixer(mixer)
    assert (layer(x.reshape(8, 5)).reshape(2, 4, 3) - layer.base(x) - expected).abs().max() > 1e-3


def test_zero_residual_expert_changes_nothing_bit_for_bit() -> None:
    with_personal, without = layer_with(3), layer_with(2)
    with torch.no_grad():
        for e in range(2):
            with_personal.lora_A[e].copy_(without.lora_A[e])
            with_personal.lora_B[e].copy_(without.lora_B[e])
        with_personal.lora_B[2].zero_()
    x = torch.randn(8, 5)
    with_personal.set_mixer("lambda", residual_experts=1)
    without.set_mixer("lambda")
    assert torch.equal(with_personal(x), without(x))


@pytest.mark.parametrize(
    ("mixer", "residual", "message"),
    [("router", 1, "single and lambda"), ("lambda", 2, "at least 2 mixed"), ("single", 3, "expert 0")],
)
def test_layer_refuses_what_it_cannot_mix(mixer: str, residual: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        layer_with(3).set_mixer(mixer, residual_experts=residual)  # type: ignore[arg-type]


def test_phase_wants_residual_experts_last() -> None:
    with pytest.raises(ValueError, match="after every mixed expert"):
        PhaseSpec(experts=(ExpertSpec("a"), ExpertSpec("p", residual=True), ExpertSpec("b")), mixer="lambda")
    with pytest.raises(ValueError, match="single and lambda"):
        PhaseSpec(experts=(ExpertSpec("a"), ExpertSpec("b"), ExpertSpec("p", residual=True)), mixer="router")
    ok = PhaseSpec(experts=(ExpertSpec("a"), ExpertSpec("b"), ExpertSpec("p", residual=True)), mixer="lambda")
    assert ok.residual_experts == 1


# --- the strategy ------------------------------------------------------------------------------------------


N, LAYERS = 4, 2
SITES = tuple(Site(f"enc.{layer}.q", layer, "q", 3, 2) for layer in range(LAYERS))


def strategy(**options: Any) -> FedTreeLoRA:
    shapes = {}
    for s in SITES:
        for e in ("cluster", "external", "personal") if options.get("personal") else ("cluster", "external"):
            shapes[f"{s.name}.{e}.lora_A"] = (1, s.d_in)
            shapes[f"{s.name}.{e}.lora_B"] = (s.d_out, 1)
    context = FederationContext(N, SITES, LAYERS, ("q",), 10, (10,) * N, 0, 1, shapes)
    return FedTreeLoRA(FedTreeLoRAOptions(warmup_rounds=1, tau=-1.0, **options), context)


def test_personal_is_never_sent_nor_taken_and_trains_after_warmup() -> None:
    tree = strategy(personal=True)
    assert tree.experts_for(tree.options) == ("cluster", "external", "personal")
    warmup, federated = tree.phase(0), tree.phase(1)
    assert [(e.name, e.trainable, e.residual) for e in warmup.experts] == [
        ("cluster", True, False),
        ("external", False, False),
        ("personal", False, False),
    ], "warm-up is local training of the cluster expert alone"
    assert [(e.name, e.trainable, e.residual) for e in federated.experts][2] == ("personal", True, True)
    assert "personal" not in tree.zero_init_experts, "a zero A would never train"
    state = tree.initial_state(torch.Generator().manual_seed(0))
    assert all(float(v.abs().max()) > 0 for k, v in state.items() if k.endswith(".personal.lora_A"))
    for rnd in range(3):
        keys = list(tree.upload_keys(rnd, 0))
        assert keys and all(".cluster." in k for k in keys)
        ups = {c: {k: torch.full(state[k].shape, float(c + rnd)) for k in keys} for c in range(N)}
        tree.aggregate(rnd, ups)
        for c in range(N):
            assert not any(".personal." in k for k in tree.payload(rnd + 1, c))


def test_warmup_init_sends_each_client_its_own_adapter_until_it_trains_and_survives_a_checkpoint() -> None:
    tree = strategy(personal=True, personal_init="warmup")
    state = tree.initial_state(torch.Generator().manual_seed(0))
    keys = list(tree.upload_keys(0, 0))
    own = {c: {k: torch.full(state[k].shape, float(c + 1)) for k in keys} for c in range(N)}
    tree.aggregate(0, own)  # the last (only) warm-up round: the plan and the personal starts
    for c in range(N):
        first = tree.payload(1, c)
        for k in keys:
            assert torch.equal(first[k.replace(".cluster.", ".personal.")], own[c][k]), "its own, not the mean"
    # Client 3 is not sampled in the first federated round: the others trained from their start, it has not.
    tree.aggregate(1, {c: own[c] for c in range(N - 1)})
    for c in range(N - 1):
        assert not any(".personal." in k for k in tree.payload(2, c)), "sent until the client trained with it"
    late = tree.payload(2, N - 1)
    for k in keys:
        assert torch.equal(late[k.replace(".cluster.", ".personal.")], own[N - 1][k]), "still on its way"
    tree.aggregate(2, {N - 1: own[N - 1]})
    assert not any(".personal." in k for k in tree.payload(3, N - 1)), "and no longer once it trained"
    tree = strategy(personal=True, personal_init="warmup")
    tree.aggregate(0, own)
    again = strategy(personal=True, personal_init="warmup")
    tensors, meta = tree.state_dict()
    again.load_state_dict(tensors, meta)
    for c in range(N):
        a, b = tree.payload(1, c), again.payload(1, c)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    zero = strategy(personal=True)
    zero.aggregate(0, own)
    assert not any(".personal." in k for c in range(N) for k in zero.payload(1, c))


def test_personal_init_needs_personal() -> None:
    with pytest.raises(ConfigError, match="personal=true"):
        load_config(method="fedtreelora", fedtreelora={"personal_init": "warmup"})


def test_personal_draws_the_other_experts_as_without_it() -> None:
    plain = strategy().initial_state(torch.Generator().manual_seed(3))
    personal = strategy(personal=True).initial_state(torch.Generator().manual_seed(3))
    assert all(torch.equal(personal[k], v) for k, v in plain.items())


def test_personal_needs_the_lambda_mixer() -> None:
    with pytest.raises(ConfigError, match="personal"):
        load_config(method="fedtreelora", fedtreelora={"personal": True, "mixer": "router"})


# --- whole runs --------------------------------------------------------------------------------------------

SMALL = [
    "model.num_layers=2",
    "model.max_length=32",
    "model.dropout=0.1",
    "data.num_clients=4",
    "data.n_train=16",
    "data.n_val=16",
    "train.local_epochs=1",
    "train.batch_size=8",
    "federation.rounds=3",
    "fedtreelora.warmup_rounds=1",
    "fedtreelora.tau=-1",  # branches at once: both layers have an external expert
    "logging.tensorboard=false",
]
SCORES = ("train_loss", "accuracy", "eval_loss", "received_accuracy", "received_eval_loss")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, tuple[dict[str, Any], list[dict[str, Any]], Path]]:
    """FedTreeLoRA with and without the personal expert, one torch thread: (summary, metric rows, folder)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    try:
        for personal in (False, True):
            folder = tmp_path_factory.mktemp(f"personal-{personal}")
            config = load_config(
                method="fedtreelora", overrides=[*SMALL, f"fedtreelora.personal={str(personal).lower()}"]
            )
            summary = SimulationEngine(config, folder, quiet=True, report=False).run()
            rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line]
            out[personal] = summary, rows, folder
    finally:
        torch.set_num_threads(threads)
    return out


def scores(rows: list[dict[str, Any]], phase: str) -> list[tuple[int, int, tuple[float, ...]]]:
    return [(r["round"], r["client"], tuple(r[f] for f in SCORES)) for r in rows if r.get("phase") == phase]


@pytest.mark.slow
def test_warmup_and_plan_are_the_papers_bit_for_bit(runs) -> None:  # type: ignore[no-untyped-def]
    (plain, plain_rows, _), (personal, personal_rows, _) = runs[False], runs[True]
    assert scores(plain_rows, "warmup") and scores(plain_rows, "warmup") == scores(personal_rows, "warmup")
    assert plain["plan"] == personal["plan"], "the tree is built from the same warm-up B matrices"
    federated = scores(plain_rows, "federated")
    assert federated and federated != scores(personal_rows, "federated"), "afterwards the personal expert acts"


@pytest.mark.slow
def test_personal_expert_trains_stays_private_and_differs(runs) -> None:  # type: ignore[no-untyped-def]
    summary, _, folder = runs[True]
    meta = json.loads((folder / "clients" / "meta.json").read_text())
    assert meta["final_phase"]["residual"] == ["personal"]
    states = [load_file(str(p)) for p in sorted((folder / "clients").glob("client_*.safetensors"))]
    personal_b = [torch.cat([v.flatten() for k, v in s.items() if k.endswith(".personal.lora_B")]) for s in states]
    assert all(float(b.abs().max()) > 0 for b in personal_b), "B starts at zero and must have trained"
    assert not torch.equal(personal_b[0], personal_b[1]), "each client trains its own"
    # never averaged: even clients that share every layer's cluster keep different personal experts
    labels = summary["plan"]["labels"]
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4) if all(row[i] == row[j] for row in labels)]
    for i, j in pairs:
        assert not torch.equal(personal_b[i], personal_b[j])
