"""The baseline strategies (FFA-LoRA, FedSA-LoRA, FedDPA, FedALT, FedLEASE) and FedTreeLoRA's ablation
options: server side on tiny tensors against hand-computed averages, what stays local, what is
frozen (no gradient reaches it on a real MiniLM cut to 2 layers), and a run of every method."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from fedtreelora.adapters import AdapterBank, ExpertSpec, MultiClientLoraLinear, Site
from fedtreelora.config import load_config
from fedtreelora.core import cut_exact
from fedtreelora.engines import SimulationEngine, build_federation
from fedtreelora.models import load_classifier
from fedtreelora.strategies import STRATEGIES, FederationContext, Strategy, get_strategy
from fedtreelora.train.instance_weighting import InstanceWeighting

N, LAYERS = 4, 2
SITES = tuple(Site(f"enc.{layer}.q", layer, "q", 3, 2) for layer in range(LAYERS))
A0, A1, B0, B1 = "enc.0.q.{}.lora_A", "enc.1.q.{}.lora_A", "enc.0.q.{}.lora_B", "enc.1.q.{}.lora_B"


def context(experts: Sequence[str], num_examples: tuple[int, ...] = (10,) * N) -> FederationContext:
    """N clients, 2 layers with one module ``q`` (d_in 3, d_out 2), rank 1."""
    shapes: dict[str, tuple[int, ...]] = {}
    for s in SITES:
        for e in experts:
            shapes[f"{s.name}.{e}.lora_A"] = (1, s.d_in)
            shapes[f"{s.name}.{e}.lora_B"] = (s.d_out, 1)
        shapes[f"{s.name}.mix_logit"] = ()
        shapes[f"{s.name}.router"] = (len(experts), s.d_in)
        shapes[f"{s.name}.topm_router"] = (2 * len(experts) - 1, s.d_in)
        shapes[f"{s.name}.expert_mask"] = (len(experts),)
    return FederationContext(N, SITES, LAYERS, ("q",), 10, num_examples, 0, 1, shapes)


def make(name: str, **options: object) -> Strategy:
    cls = get_strategy(name)
    opts = cls.Options(**options)
    return cls(opts, context(cls.experts_for(opts)))


def uploads(
    expert: str,
    b_by_layer: Sequence[Sequence[float | Sequence[float]]],
    clients: Sequence[int] = range(N),
    router_rows: int = 0,
) -> dict[int, dict[str, torch.Tensor]]:
    """Client k uploads A = k + 1 everywhere and B = b_by_layer[layer][k] (a scalar fills B, a pair
    sets its two rows); with ``router_rows`` also a top-M router (router_rows, 3) filled with 10 * (k + 1)."""
    out = {}
    for k in clients:
        t = {}
        for s in SITES:
            t[f"{s.name}.{expert}.lora_A"] = torch.full((1, 3), float(k + 1))
            b = torch.tensor(b_by_layer[s.layer][k], dtype=torch.float32)
            t[f"{s.name}.{expert}.lora_B"] = b.expand(2, 1).clone() if b.ndim == 0 else b[:, None]
            if router_rows:
                t[f"{s.name}.topm_router"] = torch.full((router_rows, s.d_in), 10.0 * (k + 1))
        out[k] = t
    return out


def only(tensors: dict[str, torch.Tensor], *keys: str) -> dict[str, torch.Tensor]:
    """``tensors`` restricted to ``keys`` (and an assertion that nothing else is there)."""
    assert set(tensors) == set(keys), sorted(set(tensors) ^ set(keys))
    return tensors


def full(value: float, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.full(shape, float(value))


# --- FFA-LoRA ------------------------------------------------------------------------------------


def test_ffa_freezes_a_and_averages_only_b() -> None:
    strategy = make("ffa")
    phase = strategy.phase(0)
    assert phase.mixer == "single" and phase.experts == (ExpertSpec("shared", train_a=False, train_b=True),)
    assert list(strategy.upload_keys(0, 2)) == [B0.format("shared"), B1.format("shared")]
    assert strategy.payload(0, 1) == {}, "round 0: every client holds the shared initialisation"
    sent = uploads("shared", [[1, 2, 3, 6], [0, 0, 0, 4]])
    strategy.aggregate(0, {k: {key: t[key] for key in strategy.upload_keys(0, k)} for k, t in sent.items()})
    for k in range(N):
        p = only(strategy.payload(1, k), B0.format("shared"), B1.format("shared"))
        assert torch.allclose(p[B0.format("shared")], full(3.0, (2, 1)))
        assert torch.allclose(p[B1.format("shared")], full(1.0, (2, 1)))


def test_ffa_example_weighting() -> None:
    cls = get_strategy("ffa")
    strategy = cls(cls.Options(weighting="examples"), context(("shared",), (1, 1, 1, 5)))
    sent = uploads("shared", [[0, 0, 0, 8], [0, 0, 0, 0]])
    strategy.aggregate(0, {k: {B0.format("shared"): t[B0.format("shared")]} for k, t in sent.items()})
    assert strategy.payload(1, 0)[B0.format("shared")][0, 0].item() == pytest.approx(8 * 5 / 8)


# --- FedSA-LoRA ----------------------------------------------------------------------------------


def test_fedsa_averages_a_and_keeps_b_local() -> None:
    strategy = make("fedsa")
    phase = strategy.phase(3)
    assert phase.experts == (ExpertSpec("shared"),), "both factors train"
    assert list(strategy.upload_keys(0, 0)) == [A0.format("shared"), A1.format("shared")]
    sent = uploads("shared", [[1, 2, 3, 6], [0, 0, 0, 4]])
    strategy.aggregate(0, {k: {key: t[key] for key in strategy.upload_keys(0, k)} for k, t in sent.items()})
    for k in range(N):
        p = only(strategy.payload(1, k), A0.format("shared"), A1.format("shared"))
        assert torch.allclose(p[A0.format("shared")], full(2.5, (1, 3)))
        assert torch.allclose(p[A1.format("shared")], full(2.5, (1, 3)))


# --- FedDPA --------------------------------------------------------------------------------------


def test_feddpa_averages_the_global_adapter_and_keeps_the_local_one() -> None:
    strategy = make("feddpa")
    phase = strategy.phase(0)
    assert phase.experts == (ExpertSpec("global"), ExpertSpec("local")), "both adapters train"
    assert phase.mixer == "fixed" and phase.fixed_weights == (0.5, 0.5)
    assert isinstance(phase.evaluate, InstanceWeighting)
    assert list(strategy.upload_keys(0, 1)) == [
        A0.format("global"),
        B0.format("global"),
        A1.format("global"),
        B1.format("global"),
    ]
    strategy.aggregate(0, uploads("global", [[1, 2, 3, 6], [0, 0, 0, 4]]))
    for k in range(N):
        p = only(strategy.payload(1, k), *strategy.upload_keys(1, k))
        assert torch.allclose(p[A1.format("global")], full(2.5, (1, 3)))
        assert torch.allclose(p[B0.format("global")], full(3.0, (2, 1)))
        assert not any(".local." in key for key in p), "the local adapter never leaves the client"


def test_feddpa_fixed_inference_and_training_weight() -> None:
    phase = make("feddpa", inference="fixed", local_weight=0.3).phase(2)
    assert phase.evaluate is None, "fixed weights: evaluate as trained"
    assert phase.fixed_weights == pytest.approx((0.7, 0.3))


def test_feddpa_local_weight_is_scaled_mean_cosine_similarity() -> None:
    reference = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    test = torch.tensor([[2.0, 0.0], [-1.0, 0.0]])
    cos = torch.tensor([[1.0, 0.0, 1 / math.sqrt(2)], [-1.0, 0.0, -1 / math.sqrt(2)]])
    every = InstanceWeighting(max_weight=0.5, num_reference=None)
    torch.testing.assert_close(every.local_weights(test, reference, np.random.default_rng(0)), 0.5 * cos.mean(1))
    # one reference drawn per test instance: alpha is 0.5 * cos to one of them, and the draws vary
    one = InstanceWeighting(max_weight=0.5, num_reference=1)
    alphas = one.local_weights(test[:1].expand(200, 2), reference, np.random.default_rng(0))
    values = {round(v, 4) for v in alphas.tolist()}
    assert values == {0.5, 0.0, round(0.5 / math.sqrt(2), 4)}
    assert len(one.local_weights(test[:0], reference, np.random.default_rng(0))) == 0


# --- FedALT --------------------------------------------------------------------------------------


def test_fedalt_sends_each_client_the_mean_of_the_others() -> None:
    strategy = make("fedalt")
    phase = strategy.phase(0)
    assert phase.mixer == "router" and phase.train_mixer
    assert phase.experts == (ExpertSpec("individual"), ExpertSpec("rest", train_a=False, train_b=False))
    assert strategy.payload(0, 0) == {}, "round 0: the rest-of-world LoRA starts at zero"
    assert strategy.zero_init_experts == ("rest",)
    assert list(strategy.upload_keys(0, 0)) == [
        A0.format("individual"),
        B0.format("individual"),
        A1.format("individual"),
        B1.format("individual"),
    ]
    strategy.aggregate(0, uploads("individual", [[1, 2, 3, 6], [0, 0, 0, 4]]))
    for k in range(N):
        p = only(strategy.payload(1, k), *(key.format("rest") for key in (A0, B0, A1, B1)))
        others = [c for c in range(N) if c != k]
        assert torch.allclose(p[A0.format("rest")], full(np.mean([c + 1 for c in others]), (1, 3)))
        assert torch.allclose(p[B0.format("rest")], full(np.mean([[1, 2, 3, 6][c] for c in others]), (2, 1)))
        assert torch.allclose(p[B1.format("rest")], full(np.mean([[0, 0, 0, 4][c] for c in others]), (2, 1)))


def test_fedalt_partial_participation() -> None:
    strategy = make("fedalt")
    strategy.aggregate(0, uploads("individual", [[1, 2, 3, 6], [0, 0, 0, 4]], clients=[0, 1]))
    assert torch.allclose(strategy.payload(1, 0)[A0.format("rest")], full(2.0, (1, 3))), "client 1's alone"
    assert torch.allclose(strategy.payload(1, 1)[A0.format("rest")], full(1.0, (1, 3)))
    assert torch.allclose(strategy.payload(1, 3)[A0.format("rest")], full(1.5, (1, 3))), "all participants"


# --- FedLEASE ------------------------------------------------------------------------------------

# B directions: clients {0, 1} point one way, {2, 3} another (cosine distance sees direction only).
TWO_GROUPS = [[[1.0, 0.1], [1.0, 0.0], [0.0, 1.0], [0.1, 1.0]]] * LAYERS


def test_fedlease_clusters_once_and_sends_every_cluster_expert() -> None:
    strategy = make("fedlease", warmup_rounds=2, max_clusters=3)
    assert type(strategy).experts_for(strategy.options) == ("own", "other_1", "other_2")
    assert strategy.zero_init_experts == ("other_1", "other_2")
    assert strategy.phase(0).mixer == "single" and strategy.phase(0).name == "warmup"
    assert strategy.payload(0, 0) == {} and strategy.aggregate(0, uploads("own", TWO_GROUPS)) == {}
    assert strategy.labels is None, "the clustering waits for the last warm-up round"
    info = strategy.aggregate(1, uploads("own", TWO_GROUPS))
    assert info["clusters"] == 2 and strategy.labels.tolist() == [0, 0, 1, 1]
    assert set(strategy.scores) == {2, 3} and strategy.scores[2] > strategy.scores[3]
    assert strategy.sharing_labels().tolist() == [[0, 0, 1, 1]] * LAYERS, "one partition for every layer"
    phase = strategy.phase(2)
    assert phase.mixer == "topm" and phase.train_mixer
    assert [(e.name, e.trainable) for e in phase.experts] == [("own", True), ("other_1", False), ("other_2", False)]
    p0, p3 = strategy.payload(2, 0), strategy.payload(2, 3)
    own_keys = [key.format("own") for key in (A0, B0, A1, B1)]
    masks = [f"{s.name}.expert_mask" for s in SITES]
    only(p0, *own_keys, *(key.replace(".own.", ".other_1.") for key in own_keys), *masks)  # other_2 stays zero
    assert all(p0[key].tolist() == [1.0, 1.0, 0.0] for key in masks), "two experts exist, the third slot is empty"
    assert torch.allclose(p0[A0.format("own")], full(1.5, (1, 3)))
    assert torch.allclose(p0[B1.format("own")], torch.tensor([[1.0], [0.05]]))
    assert torch.allclose(p0[A0.format("other_1")], full(3.5, (1, 3)))
    assert torch.allclose(p3[A1.format("own")], full(3.5, (1, 3)))
    assert torch.allclose(p3[B0.format("other_1")], torch.tensor([[1.0], [0.05]]))
    assert not any("router" in key for key in p0), "no router has trained yet: each client keeps its init"
    # later rounds: the own expert and the router go up and are averaged within each cluster only
    routers = [f"{s.name}.topm_router" for s in SITES]
    assert list(strategy.upload_keys(2, 0)) == [*strategy.expert_keys("own"), *routers]
    assert list(strategy.upload_keys(1, 0)) == strategy.expert_keys("own"), "no router goes up during warm-up"
    strategy.aggregate(2, uploads("own", [[0.0, 2.0, 4.0, 8.0]] * LAYERS, router_rows=5))
    p1, p2 = strategy.payload(3, 1), strategy.payload(3, 2)
    assert torch.allclose(p1[B0.format("own")], full(1.0, (2, 1)))
    assert torch.allclose(p1[B0.format("other_1")], full(6.0, (2, 1)))
    assert all(torch.equal(p1[key], full(15.0, (5, 3))) for key in routers), "mean of clients 0 and 1 only"
    assert all(torch.equal(p2[key], full(35.0, (5, 3))) for key in routers), "mean of clients 2 and 3 only"


def test_fedlease_keeps_routers_local_when_asked() -> None:
    strategy = make("fedlease", warmup_rounds=1, max_clusters=3, router_sharing="local")
    strategy.aggregate(0, uploads("own", TWO_GROUPS))
    assert list(strategy.upload_keys(1, 0)) == strategy.expert_keys("own")
    strategy.aggregate(1, uploads("own", TWO_GROUPS, router_rows=5))
    assert not any("router" in key for key in strategy.payload(2, 0))


def test_fedlease_initial_state_routes_over_the_own_expert_with_kaiming_uniform_routers() -> None:
    strategy = make("fedlease", max_clusters=3)
    state = strategy.initial_state(torch.Generator().manual_seed(0))
    for s in SITES:
        assert state[f"{s.name}.expert_mask"].tolist() == [1.0, 0.0, 0.0], "before the clustering: own expert alone"
        router = state[f"{s.name}.topm_router"]
        assert router.shape == (5, s.d_in) and router.std() > 0
        assert router.abs().max() <= 1.0 / math.sqrt(s.d_in), "nn.Linear's default (kaiming_uniform_(a=sqrt(5)))"
    base = Strategy.initial_state(strategy, torch.Generator().manual_seed(0))
    assert all(torch.equal(state[k], base[k]) for k in base if ".lora_A" in k), "the LoRA init is unchanged"


def test_fedlease_newcomer_router_is_left_out_of_the_cluster_mean() -> None:
    strategy = make("fedlease", warmup_rounds=1, max_clusters=3)
    strategy.aggregate(0, uploads("own", TWO_GROUPS, clients=[0, 1, 2]))  # client 3 misses warm-up
    assert strategy.payload(1, 3) == {}, "not placed yet: it keeps its own expert alone"
    info = strategy.aggregate(1, uploads("own", TWO_GROUPS, router_rows=5))
    assert info["placed"] == [3] and strategy.labels[3] == strategy.labels[2]
    key = f"{SITES[0].name}.topm_router"
    assert torch.equal(strategy.payload(2, 3)[key], full(30.0, (5, 3))), "client 2's router alone"


def test_fedlease_with_two_clients_keeps_one_cluster() -> None:
    cls = get_strategy("fedlease")
    opts = cls.Options(warmup_rounds=1)
    ctx = context(cls.experts_for(opts))
    strategy = cls(opts, FederationContext(2, ctx.sites, LAYERS, ("q",), 5, (10, 10), 0, 1, ctx.state_shapes))
    strategy.aggregate(0, uploads("own", TWO_GROUPS, clients=[0, 1]))
    assert strategy.labels.tolist() == [0, 0]
    assert not any(".other_" in key for key in strategy.payload(1, 0))


# --- FedTreeLoRA ablations -----------------------------------------------------------------------

# layer 0: everyone alike; layer 1: {0, 1} vs {2, 3} (the example of test_strategies.py)
TRUNK_THEN_TWO = [[1.0, 1.01, 0.99, 1.0], [0.0, 0.1, 5.0, 5.1]]


def test_fedtreelora_defaults_are_the_method() -> None:
    strategy = make("fedtreelora")
    assert type(strategy).experts_for(strategy.options) == ("cluster", "external")
    assert strategy.zero_init_experts == ("external",)
    phase = strategy.phase(strategy.options.warmup_rounds)
    assert phase.mixer == "lambda" and phase.train_mixer
    assert phase.experts == (ExpertSpec("cluster"), ExpertSpec("external", train_a=False, train_b=False))


def test_fedtreelora_fixed_cut_gives_k_clusters_at_every_layer() -> None:
    tree = make("fedtreelora", warmup_rounds=1, tau=0.0, window=3)
    tree.aggregate(0, uploads("cluster", TRUNK_THEN_TWO))
    assert tree.plan.cuts.tolist() == [1, 2], "the method keeps a trunk here"
    fixed = make("fedtreelora", warmup_rounds=1, tau=0.0, window=3, cut_mode="fixed", fixed_clusters=2)
    fixed.aggregate(0, uploads("cluster", TRUNK_THEN_TWO))
    assert fixed.plan.cuts.tolist() == [2, 2]
    assert fixed.plan.labels.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]
    p0 = fixed.payload(1, 0)
    assert torch.allclose(p0[A0.format("cluster")], full(1.5, (1, 3))), "layer 0 is no longer shared by all"
    assert torch.allclose(p0[A0.format("external")], full(3.5, (1, 3)))
    three = make("fedtreelora", warmup_rounds=1, cut_mode="fixed", fixed_clusters=3)
    three.aggregate(0, uploads("cluster", TRUNK_THEN_TWO))
    assert three.plan.cuts.tolist() == [3, 3] and [len(set(row)) for row in three.plan.labels.tolist()] == [3, 3]


def _nested(labels: np.ndarray) -> bool:
    """Whether every cluster of each layer lies inside one cluster of the layer before."""
    return all(
        len(set(labels[layer - 1][labels[layer] == c].tolist())) == 1
        for layer in range(1, len(labels))
        for c in np.unique(labels[layer])
    )


def test_fedtreelora_independent_cuts_need_not_nest() -> None:
    # layer 0 splits {0, 1} | {2, 3}; layer 1 splits {0, 2} | {1, 3}
    crossed = [[0.0, 0.1, 5.0, 5.1], [0.0, 5.0, 0.1, 5.1]]
    tree = make("fedtreelora", warmup_rounds=1, tau=0.0, window=2)
    tree.aggregate(0, uploads("cluster", crossed))
    assert _nested(tree.plan.labels), "the one tree always nests"
    independent = make("fedtreelora", warmup_rounds=1, tau=0.0, window=2, cut_mode="independent")
    independent.aggregate(0, uploads("cluster", crossed))
    assert independent.plan.labels.tolist() == [[0, 0, 1, 1], [0, 1, 0, 1]]
    assert not _nested(independent.plan.labels)
    assert independent.plan.cuts.tolist() == [2, 2]
    p1 = independent.payload(1, 1)
    assert torch.allclose(p1[A0.format("cluster")], full(1.5, (1, 3)))  # layer 0: {0, 1}
    assert torch.allclose(p1[A1.format("cluster")], full(3.0, (1, 3)))  # layer 1: {1, 3}
    assert torch.allclose(p1[A1.format("external")], full(2.0, (1, 3)))  # layer 1: {0, 2}


def test_fedtreelora_without_external_expert_sends_only_the_cluster_expert() -> None:
    strategy = make("fedtreelora", warmup_rounds=1, tau=0.0, window=3, external="none")
    assert type(strategy).experts_for(strategy.options) == ("cluster",)
    phase = strategy.phase(1)
    assert phase.mixer == "single" and phase.experts == (ExpertSpec("cluster"),)
    strategy.aggregate(0, uploads("cluster", TRUNK_THEN_TWO))
    p0 = only(strategy.payload(1, 0), *(key.format("cluster") for key in (A0, B0, A1, B1)))
    assert torch.allclose(p0[A0.format("cluster")], full(2.5, (1, 3)))
    assert torch.allclose(p0[A1.format("cluster")], full(1.5, (1, 3)))
    with pytest.raises(ValueError, match="nothing to mix"):
        get_strategy("fedtreelora").Options(external="none", mixer="router")


# layers alike: {0, 1} close, 2 and 3 apart; cut into 3 clusters {0, 1}, {2}, {3}
THREE_GROUPS = [[0.0, 0.1, 5.0, 10.0], [0.0, 0.1, 5.0, 10.0]]


@pytest.mark.parametrize("mixer", ["lambda", "router"])
def test_fedtreelora_per_cluster_sends_one_expert_per_other_cluster(mixer: str) -> None:
    strategy = make(
        "fedtreelora", warmup_rounds=1, cut_mode="fixed", fixed_clusters=3, external="per_cluster", max_clusters=4,
        mixer=mixer,
    )  # fmt: skip
    names = type(strategy).experts_for(strategy.options)
    assert names == ("cluster", "other_1", "other_2", "other_3")
    assert strategy.zero_init_experts == names[1:]
    phase = strategy.phase(1)
    assert phase.mixer == mixer and [e.trainable for e in phase.experts] == [True, False, False, False]
    strategy.aggregate(0, uploads("cluster", THREE_GROUPS))
    assert strategy.plan.labels.tolist() == [[0, 0, 1, 2]] * LAYERS
    scaled = mixer == "lambda"  # B of each other cluster times its share of the clients outside
    p0, p2 = strategy.payload(1, 0), strategy.payload(1, 2)
    slots = ("cluster", "other_1", "other_2")
    only(p0, *(key.format(e) for e in slots for key in (A0, B0, A1, B1)))  # other_3 unused: never sent
    assert torch.allclose(p0[A0.format("cluster")], full(1.5, (1, 3)))
    assert torch.allclose(p0[A0.format("other_1")], full(3.0, (1, 3)))  # cluster {2}
    assert torch.allclose(p0[A0.format("other_2")], full(4.0, (1, 3)))  # cluster {3}
    assert torch.allclose(p0[B0.format("other_1")], full(5.0 * (0.5 if scaled else 1.0), (2, 1)))
    assert torch.allclose(p0[B1.format("other_2")], full(10.0 * (0.5 if scaled else 1.0), (2, 1)))
    assert torch.allclose(p2[A1.format("cluster")], full(3.0, (1, 3)))
    assert torch.allclose(p2[A1.format("other_1")], full(1.5, (1, 3)))  # cluster {0, 1}
    assert torch.allclose(p2[B1.format("other_1")], full(0.05 * (2 / 3 if scaled else 1.0), (2, 1)))
    assert torch.allclose(p2[B1.format("other_2")], full(10.0 * (1 / 3 if scaled else 1.0), (2, 1)))
    assert not any("router" in key or "mix_logit" in key for key in p0), "the mixer stays on the client"


def test_fedtreelora_per_cluster_caps_the_cut_at_max_clusters() -> None:
    free = make("fedtreelora", warmup_rounds=1, tau=0.0, window=3)
    free.aggregate(0, uploads("cluster", [TRUNK_THEN_TWO[0], THREE_GROUPS[1]]))
    assert free.plan.cuts.tolist() == [1, 3]
    capped = make("fedtreelora", warmup_rounds=1, tau=0.0, window=3, external="per_cluster", max_clusters=2)
    capped.aggregate(0, uploads("cluster", [TRUNK_THEN_TWO[0], THREE_GROUPS[1]]))
    assert capped.plan.cuts.tolist() == [1, 2]
    assert capped.plan.labels[1].tolist() == cut_exact(capped.plan.tree, N, 2).tolist()
    layer_1_other = {A1.format("other_1"), B1.format("other_1")}  # layer 0 is the trunk: no other cluster
    assert set(capped.payload(1, 3)) == {key.format("cluster") for key in (A0, B0, A1, B1)} | layer_1_other
    with pytest.raises(ValueError, match="exceeds max_clusters"):
        get_strategy("fedtreelora").Options(external="per_cluster", cut_mode="fixed", fixed_clusters=5)


def test_fedtreelora_router_instead_of_lambda_sends_the_same_experts() -> None:
    lam = make("fedtreelora", warmup_rounds=1, tau=0.0, window=3)
    router = make("fedtreelora", warmup_rounds=1, tau=0.0, window=3, mixer="router")
    phase = router.phase(1)
    assert phase.mixer == "router" and phase.train_mixer and phase.experts == lam.phase(1).experts
    for s in (lam, router):
        s.aggregate(0, uploads("cluster", TRUNK_THEN_TWO))
    for k in range(N):
        a, b = lam.payload(1, k), router.payload(1, k)
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


# --- server state round trips ------------------------------------------------------------------


def _defaults(name: str) -> dict[str, Any]:
    """Options that let a method's server do everything within two rounds: one warm-up round where it
    warms up (3-cluster cap where it clusters, as the 4 test clients allow)."""
    fields = get_strategy(name).Options.model_fields
    options: dict[str, Any] = {"warmup_rounds": 1} if "warmup_rounds" in fields else {}
    return options | ({"max_clusters": 3} if name == "fedlease" else {})


#: every registered strategy (a new method is covered without touching this list) and the ablations
#: whose server state differs from the default's
ROUND_TRIP = [(name, _defaults(name)) for name in STRATEGIES] + [
    ("fedtreelora", {"warmup_rounds": 1, "cut_mode": "independent", "tau": 0.0}),
    ("fedtreelora", {"warmup_rounds": 1, "cut_mode": "fixed", "fixed_clusters": 3, "external": "per_cluster"}),
    ("fedtreelora", {"warmup_rounds": 1, "external": "none", "tau": 0.0}),
    ("fedtreelora", {"warmup_rounds": 1, "personal": True, "tau": 0.0}),
]


@pytest.mark.parametrize(("name", "options"), ROUND_TRIP)
def test_server_state_round_trips_to_identical_payloads(name: str, options: dict) -> None:
    first = make(name, **options)
    expert = type(first).experts_for(first.options)[0]
    sent = uploads(
        expert,
        [[[1.0, 0.1], [1.0, 0.0], [0.0, 1.0], [0.1, 1.0]], [[0.0, 0.3], [0.2, 0.3], [5, 0], [5, 1]]],
        router_rows=5,
    )
    first.aggregate(0, {k: {key: t[key] for key in first.upload_keys(0, k)} for k, t in sent.items()})
    first.aggregate(1, {k: {key: t[key] * 2 for key in first.upload_keys(1, k)} for k, t in sent.items()})
    tensors, meta = first.state_dict()
    sends = any(first.payload(2, k) for k in range(N))
    assert bool(tensors) == sends, "a server that sends something after two rounds holds it in its state"
    second = make(name, **options)
    second.load_state_dict(tensors, json.loads(json.dumps(meta)))
    for k in range(N):
        a, b = first.payload(2, k), second.payload(2, k)
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
        assert bool(a) == sends
    la, lb = first.sharing_labels(), second.sharing_labels()
    assert (la is None and lb is None) or np.array_equal(la, lb)


@pytest.mark.parametrize(("name", "options"), ROUND_TRIP)
def test_aggregating_with_torch_on_a_device_sends_what_numpy_sends(name: str, options: dict) -> None:
    """``federation.server_device`` moves aggregation to torch float64 (here on the CPU, as CI has no
    GPU); payloads and the sharing plan must match the numpy path. Client 3 misses warm-up and is
    placed by its first upload, so the late-client path runs on torch too."""
    servers = []
    for device in (None, "cpu"):
        cls = get_strategy(name)
        opts = cls.Options(**options)
        server = cls(opts, dataclasses.replace(context(cls.experts_for(opts)), server_device=device))
        expert = cls.experts_for(opts)[0]
        sent = uploads(
            expert,
            [[[1.0, 0.1], [1.0, 0.0], [0.0, 1.0], [0.1, 1.0]], [[0.0, 0.3], [0.2, 0.3], [5, 0], [5, 1]]],
            router_rows=5,
        )
        server.aggregate(0, {k: {key: sent[k][key] for key in server.upload_keys(0, k)} for k in (0, 1, 2)})
        server.aggregate(1, {k: {key: sent[k][key] * (k + 2) for key in server.upload_keys(1, k)} for k in range(N)})
        servers.append(server)
    numpy_server, torch_server = servers
    labels_np, labels_torch = numpy_server.sharing_labels(), torch_server.sharing_labels()
    assert (labels_np is None and labels_torch is None) or np.array_equal(labels_np, labels_torch)
    for k in range(N):
        a, b = numpy_server.payload(2, k), torch_server.payload(2, k)
        assert a.keys() == b.keys()
        for key in a:
            assert b[key].dtype == torch.float32 and b[key].device.type == "cpu"
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["fedtreelora", "fedlease"])
def test_clustering_without_any_warmup_upload_says_so(name: str) -> None:
    server = make(name, warmup_rounds=1)
    with pytest.raises(ValueError, match=f"no client update was accepted during warm-up; {name} cannot cluster"):
        server.aggregate(0, {})


def test_server_device_names_the_field_when_unusable() -> None:
    from fedtreelora.engines.setup import resolve_server_device

    assert resolve_server_device(None) is None
    assert resolve_server_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="federation.server_device='gpu0' is not a torch device"):
        resolve_server_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="federation.server_device='cuda' but this machine has no CUDA"):
            resolve_server_device("cuda")


# --- the layer: mixers the baselines need ---------------------------------------------------------


def test_instance_mixer_mixes_each_row_with_its_own_weights() -> None:
    torch.manual_seed(0)
    layer = MultiClientLoraLinear(nn.Linear(6, 5), num_slots=1, num_experts=2, rank=3, alpha=6.0)
    with torch.no_grad():
        for p in [*layer.lora_A, *layer.lora_B]:
            p.copy_(torch.randn(p.shape))
    x = torch.randn(3, 4, 6)  # 3 instances of 4 tokens
    weights = torch.tensor([[0.9, 0.1], [0.2, 0.8], [1.3, -0.3]])
    layer.set_mixer("instance")
    layer.set_instance_weights(weights[None])
    got = layer(x)
    layer.set_mixer("fixed")
    for i in range(3):
        layer.fixed_weights.copy_(weights[i])
        torch.testing.assert_close(got[i : i + 1], layer(x[i : i + 1]))
    layer.set_mixer("instance")
    layer.set_instance_weights(None)
    with pytest.raises(RuntimeError, match="set_instance_weights"):
        layer(x)


def test_lambda_mixer_with_more_experts_gives_each_other_expert_one_minus_lambda() -> None:
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = MultiClientLoraLinear(base, num_slots=1, num_experts=3, rank=2, alpha=4.0)
    with torch.no_grad():
        for p in [*layer.lora_A, *layer.lora_B]:
            p.copy_(torch.randn(p.shape))
        layer.mix_logit.fill_(0.4)
    layer.set_mixer("lambda")
    x = torch.randn(4, 6)
    lam, s = torch.sigmoid(torch.tensor(0.4)), 2.0
    expected = base(x) + sum(
        w * s * x @ layer.lora_A[e][0].T @ layer.lora_B[e][0].T for e, w in enumerate((lam, 1 - lam, 1 - lam))
    )
    torch.testing.assert_close(layer(x), expected)


# --- real model: no gradient reaches what is frozen -----------------------------------------------


FROZEN_CASES = [
    ("ffa", {}, 0),
    ("fedsa", {}, 0),
    ("feddpa", {}, 0),
    ("fedalt", {}, 0),
    ("fedlease", {"max_clusters": 3}, 5),
    ("fedtreelora", {"external": "per_cluster", "max_clusters": 3}, 5),
    ("fedtreelora", {"mixer": "router"}, 5),
]


@pytest.mark.parametrize(("name", "options", "rnd"), FROZEN_CASES)
def test_no_gradient_reaches_frozen_experts(name: str, options: dict, rnd: int, one_thread: None) -> None:
    cls = get_strategy(name)
    opts = cls.Options(**options)
    model = load_classifier("minilm", 2, num_layers=2, seed=0).model
    experts = cls.experts_for(opts)
    bank = AdapterBank(model, target_modules=["query", "value"], expert_names=experts, rank=2, alpha=4.0, dropout=0.0)
    ctx = FederationContext(N, tuple(bank.sites), bank.num_layers, ("query", "value"), 10, (8,) * N, 0, 2)
    phase = cls(opts, ctx).phase(rnd)
    g = torch.Generator().manual_seed(0)
    bank.write_slot(0, {k: torch.randn(v, generator=g) * 0.2 for k, v in bank.state_shapes().items()})
    bank.configure(phase)
    inputs = torch.randint(1000, 5000, (3, 10), generator=g)
    bank.model(input_ids=inputs, attention_mask=torch.ones_like(inputs), labels=torch.tensor([0, 1, 0])).loss.backward()
    specs = {e.name: e for e in phase.experts}
    for layer in bank.layers.values():
        for slot, expert in enumerate(experts):
            spec = specs.get(expert, ExpertSpec(expert, False, False))
            for factor, trained in ((layer.lora_A[slot], spec.train_a), (layer.lora_B[slot], spec.train_b)):
                if trained:
                    assert factor.grad is not None and factor.grad.abs().sum() > 0, (name, expert)
                else:
                    assert factor.grad is None, f"{name}: frozen {expert} got a gradient"
        assert (layer.router.grad is not None) == (phase.mixer == "router" and phase.train_mixer)
        assert (layer.topm_router.grad is not None) == (phase.mixer == "topm" and phase.train_mixer)
        assert (layer.mix_logit.grad is not None) == (phase.mixer == "lambda" and phase.train_mixer)
        assert layer.base.weight.grad is None


# --- FedDPA's instance-wise evaluation on a real model --------------------------------------------


def test_feddpa_instance_weighting_mixes_each_validation_instance_with_its_own_alpha(one_thread: None) -> None:
    config = load_config(
        overrides=["method=feddpa", "model.num_layers=2", "data.num_clients=2", "data.n_train=12", "data.n_val=6"]
    )
    fed = build_federation(config)
    bank, tok = fed.bank, fed.classifier.tokenizer
    g = torch.Generator().manual_seed(1)
    state = {k: (torch.randn(v.shape, generator=g) * 0.3 if ".lora_" in k else v) for k, v in fed.initial_state.items()}
    bank.write_slot(0, state)
    phase = fed.strategy.phase(1)
    bank.configure(phase)
    hook = phase.evaluate
    args = (tok, fed.train_data[0], fed.val_data[0], 4, fed.device, 7)
    alpha = hook.alphas(bank, *args)
    assert alpha.shape == (6,) and (alpha.abs() <= 0.5 + 1e-6).all() and alpha.std() > 0
    settings = dataclasses.replace(fed.settings, eval_batch_size=4)
    got = hook(bank, tok, train_data=args[1], val_data=args[2], settings=settings, device=fed.device, seed=7)
    assert got["local_weight_mean"] == pytest.approx(float(alpha.mean()))
    layers = list(bank.layers.values())
    assert all(
        layer.mixer == "fixed" and layer.instance_weights is None and layer.fixed_weights.tolist() == [0.5, 0.5]
        for layer in layers
    ), "the hook leaves the bank as it found it"
    # by hand: each instance alone under fixed weights (1 - alpha_i, alpha_i)
    from fedtreelora.train.batches import collate

    losses = []
    with torch.no_grad():
        for i in range(6):
            for layer in layers:
                layer.fixed_weights.copy_(torch.tensor([1.0 - alpha[i], alpha[i]]))
            batch = collate(tok, fed.val_data[0], np.array([i]))
            labels = batch.pop("labels")
            losses.append(nn.functional.cross_entropy(bank.model(**batch).logits, labels).item())
    assert got["eval_loss"] == pytest.approx(np.mean(losses), rel=1e-4)
    # the representations use the local adapter alone: changing the global adapter leaves alpha as is
    bank.write_slot(0, {k: v * 3 for k, v in state.items() if ".global." in k})
    torch.testing.assert_close(hook.alphas(bank, *args), alpha)
    bank.write_slot(0, {k: v * 3 for k, v in state.items() if ".local.lora_B" in k})
    assert not torch.allclose(hook.alphas(bank, *args), alpha)


# --- every method end to end ---------------------------------------------------------------------

SMOKE = [
    "model.num_layers=2",
    "data.num_clients=4",
    "data.n_train=16",
    "data.n_val=16",
    "train.batch_size=8",
    "train.local_steps=2",
    "federation.rounds=3",
    "federation.checkpoint_every=0",
    "fedtreelora.warmup_rounds=1",
    "fedlease.warmup_rounds=1",
    "fedlease.max_clusters=3",
]
ABLATIONS = [
    ["fedtreelora.cut_mode=fixed", "fedtreelora.fixed_clusters=2", "fedtreelora.external=per_cluster"],
    ["fedtreelora.cut_mode=independent", "fedtreelora.mixer=router", "fedtreelora.tau=-1.0"],
    ["fedtreelora.external=none"],
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "extra"),
    [(m, []) for m in sorted(STRATEGIES)] + [("fedtreelora", a) for a in ABLATIONS],
    ids=[*sorted(STRATEGIES), "fixed-per_cluster", "independent-router", "no-external"],
)
def test_every_method_runs(method: str, extra: list[str], tmp_path: Path, one_thread: None) -> None:
    summary = SimulationEngine(load_config(overrides=[*SMOKE, f"method={method}", *extra]), tmp_path, quiet=True).run()
    assert summary["method"] == method and summary["rounds"] == 3
    assert all(math.isfinite(h["mean_accuracy"]) and math.isfinite(h["mean_train_loss"]) for h in summary["history"])
    assert all(0.0 <= a <= 1.0 for a in summary["per_client"])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 4
    if method == "feddpa":
        assert all(math.isfinite(r["local_weight_mean"]) for r in rows), "evaluated with instance-wise weights"
    # one factor of 4 adapted modules (query, value in 2 layers): rank x 384 float32 values each
    factor_bytes = 4 * summary_rank(tmp_path) * 384 * 4
    if method in ("ffa", "fedsa"):
        assert all(r["uplink_bytes"] == factor_bytes for r in rows), "only B (ffa) or A (fedsa) goes up"
    if method in ("fedit", "fedalt", "feddpa"):
        assert all(r["uplink_bytes"] == 2 * factor_bytes for r in rows), "one LoRA goes up"
    if method == "fedlease":  # after warm-up its router goes up too: 2 * max_clusters - 1 rows of 384 per module
        router_bytes = 4 * (2 * 3 - 1) * 384 * 4
        assert all(r["uplink_bytes"] == 2 * factor_bytes + router_bytes * (r["phase"] != "warmup") for r in rows)


def summary_rank(run_dir: Path) -> int:
    """The LoRA rank the run used (from its written config)."""
    return load_config(run_dir / "config.yaml").model.rank
