"""Server side of each strategy on tiny tensors: who receives what, what stays local."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedtreelora.adapters import Site
from fedtreelora.strategies import FederationContext, get_strategy
from fedtreelora.strategies.fedit import FedITOptions
from fedtreelora.strategies.fedtreelora import FedTreeLoRAOptions

N, LAYERS = 4, 2
SITES = tuple(Site(f"enc.{layer}.q", layer, "q", 3, 2) for layer in range(LAYERS))


def context(num_examples: tuple[int, ...] = (10,) * N) -> FederationContext:
    shapes = {}
    for s in SITES:
        for e in ("cluster", "external", "shared", "local"):
            shapes[f"{s.name}.{e}.lora_A"] = (1, s.d_in)
            shapes[f"{s.name}.{e}.lora_B"] = (s.d_out, 1)
    return FederationContext(N, SITES, LAYERS, ("q",), 10, num_examples, 0, 1, shapes)


def uploads(expert: str, b_by_layer: list[list[float]]) -> dict[int, dict[str, torch.Tensor]]:
    """Client k uploads A = k + 1 everywhere and B = b_by_layer[layer][k] everywhere."""
    out = {}
    for k in range(N):
        t = {}
        for s in SITES:
            t[f"{s.name}.{expert}.lora_A"] = torch.full((1, 3), float(k + 1))
            t[f"{s.name}.{expert}.lora_B"] = torch.full((2, 1), b_by_layer[s.layer][k])
        out[k] = t
    return out


def test_fedit_sends_everyone_the_fedavg_of_a_and_b() -> None:
    strategy = get_strategy("fedit")(FedITOptions(), context())
    assert strategy.payload(0, 0) == {}, "round 0: everyone already holds the shared init"
    strategy.aggregate(0, uploads("shared", [[1, 2, 3, 6], [0, 0, 0, 4]]))
    for k in range(N):
        p = strategy.payload(1, k)
        assert torch.allclose(p["enc.0.q.shared.lora_A"], torch.full((1, 3), 2.5))
        assert torch.allclose(p["enc.0.q.shared.lora_B"], torch.full((2, 1), 3.0))
        assert torch.allclose(p["enc.1.q.shared.lora_B"], torch.full((2, 1), 1.0))


def test_fedit_example_weighting() -> None:
    strategy = get_strategy("fedit")(FedITOptions(weighting="examples"), context((1, 1, 1, 5)))
    strategy.aggregate(0, uploads("shared", [[0, 0, 0, 8], [0, 0, 0, 0]]))
    assert strategy.payload(1, 0)["enc.0.q.shared.lora_B"][0, 0].item() == pytest.approx(8 * 5 / 8)


def test_local_sends_and_receives_nothing() -> None:
    strategy = get_strategy("local")(get_strategy("local").Options(), context())
    assert strategy.payload(3, 1) == {} and list(strategy.upload_keys(3, 1)) == []
    assert strategy.sharing_labels().tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]


def test_fedtreelora_shares_nothing_in_warmup_then_sends_cluster_and_external_experts() -> None:
    opts = FedTreeLoRAOptions(tau=0.0, window=3, warmup_rounds=2)
    strategy = get_strategy("fedtreelora")(opts, context())
    assert strategy.phase(0).mixer == "single" and strategy.phase(2).mixer == "lambda"
    assert strategy.payload(0, 1) == {} and strategy.payload(1, 1) == {}
    assert strategy.aggregate(0, uploads("cluster", [[0, 0, 0, 0], [0, 0, 0, 0]])) == {}
    assert strategy.plan is None, "the tree is built only after the last warm-up round"
    # layer 0: all alike (trunk); layer 1: {0, 1} vs {2, 3}
    info = strategy.aggregate(1, uploads("cluster", [[1.0, 1.01, 0.99, 1.0], [0.0, 0.1, 5.0, 5.1]]))
    assert info["cuts"] == [1, 2]
    assert strategy.plan.labels.tolist() == [[0, 0, 0, 0], [0, 0, 1, 1]]
    p0, p2 = strategy.payload(2, 0), strategy.payload(2, 2)
    # layer 0 is the trunk: cluster expert = mean of all, no external expert sent (the cluster expert
    # acts alone there), and the phase says so
    assert torch.allclose(p0["enc.0.q.cluster.lora_A"], torch.full((1, 3), 2.5))
    assert "enc.0.q.external.lora_A" not in p0 and "enc.0.q.external.lora_B" not in p0
    assert strategy.phase(2).single_layers == frozenset({0}) and strategy.phase(2).mixer_at(1) == "lambda"
    # layer 1 branches: client 0 averages {0, 1}, its external is {2, 3}
    assert torch.allclose(p0["enc.1.q.cluster.lora_A"], torch.full((1, 3), 1.5))
    assert torch.allclose(p0["enc.1.q.external.lora_A"], torch.full((1, 3), 3.5))
    assert torch.allclose(p2["enc.1.q.cluster.lora_B"], torch.full((2, 1), 5.05))
    assert torch.allclose(p2["enc.1.q.external.lora_B"], torch.full((2, 1), 0.05))
    assert not any("mix_logit" in k for k in p0), "lambda stays on the client"
    assert list(strategy.upload_keys(2, 0)) == [
        "enc.0.q.cluster.lora_A",
        "enc.0.q.cluster.lora_B",
        "enc.1.q.cluster.lora_A",
        "enc.1.q.cluster.lora_B",
    ]


def test_fedtreelora_with_window_one_sends_what_fedit_sends() -> None:
    tree = get_strategy("fedtreelora")(FedTreeLoRAOptions(window=1, warmup_rounds=1), context())
    fedit = get_strategy("fedit")(FedITOptions(), context())
    rng = np.random.default_rng(0)
    b = rng.normal(size=(LAYERS, N)).tolist()
    tree.aggregate(0, uploads("cluster", b))
    fedit.aggregate(0, uploads("shared", b))
    for k in range(N):
        sent_tree, sent_fedit = tree.payload(1, k), fedit.payload(1, k)
        for key, value in sent_fedit.items():
            assert torch.allclose(sent_tree[key.replace(".shared.", ".cluster.")], value)
        assert all(torch.count_nonzero(v) == 0 for key, v in sent_tree.items() if ".external." in key)


@pytest.mark.parametrize("name", ["fedit", "fedtreelora", "local"])
def test_server_state_round_trips_to_identical_payloads(name: str) -> None:
    cls = get_strategy(name)
    options = cls.Options(**({"warmup_rounds": 1, "tau": -1.0} if name == "fedtreelora" else {}))
    expert = cls.expert_names[0]
    first = cls(options, context())
    first.aggregate(0, uploads(expert, [[1.0, 1.1, 4.0, 4.2], [0.0, 0.3, 5.0, 5.1]]))
    tensors, meta = first.state_dict()
    second = cls(options, context())
    second.load_state_dict(tensors, json.loads(json.dumps(meta)))
    for k in range(N):
        a, b = first.payload(1, k), second.payload(1, k)
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert (first.sharing_labels() is None) == (second.sharing_labels() is None)


def test_trunk_expert_of_each_method() -> None:
    """The expert ``fedtreelora export --trunk`` averages: only methods that share a whole expert have one."""
    from fedtreelora.export import ExportError, trunk_expert
    from fedtreelora.strategies import STRATEGIES

    shared = {name: cls.trunk_expert for name, cls in STRATEGIES.items() if cls.trunk_expert is not None}
    assert shared == {"fedtreelora": "cluster", "fedit": "shared", "ffa": "shared"}
    assert all(STRATEGIES[name].trunk_expert in STRATEGIES[name].expert_names for name in shared)
    assert trunk_expert("ffa") == "shared"
    for method in ("fedsa", "no-such-method"):
        with pytest.raises(ExportError, match=f"the {method} method shares no whole expert"):
            trunk_expert(method)
