"""FedTreeLoRA's cut modes live in one function (``fedtreelora.core.plan.plan_sharing``): the strategy's plan
is that function's plan in every mode, and each mode cuts the layers as it says."""

from __future__ import annotations

import json

import numpy as np
import pytest

import fedtreelora as ftl
from fedtreelora.adapters import Site
from fedtreelora.core import SharingPlan, build_tree, cut_exact
from fedtreelora.core.plan import CUT_MODES
from fedtreelora.strategies import FederationContext, get_strategy
from fedtreelora.strategies.fedtreelora import FedTreeLoRA, FedTreeLoRAOptions

N, LAYERS = 16, 6


def hierarchy_distances(seed: int = 0) -> np.ndarray:
    """(layers, N, N): layers 0-1 alike, two groups from layer 2 on, each split in two from layer 4 on."""
    rng = np.random.default_rng(seed)
    two, four = np.arange(N) * 2 // N, np.arange(N) * 4 // N
    b = rng.normal(size=(N, LAYERS, 2, 16, 4))
    for layer in range(2, LAYERS):
        b[:, layer] += rng.normal(scale=2.0, size=(2, 2, 16, 4))[two]
        if layer >= 4:
            b[:, layer] += rng.normal(scale=2.0, size=(4, 2, 16, 4))[four]
    return ftl.layer_distances(b)


def strategy(**options: object) -> FedTreeLoRA:
    sites = tuple(Site(f"enc.{layer}.q", layer, "q", 3, 2) for layer in range(LAYERS))
    context = FederationContext(N, sites, LAYERS, ("q",), 4, (10,) * N, 0, 1, {})
    made = get_strategy("fedtreelora")(FedTreeLoRAOptions(**options), context)
    assert isinstance(made, FedTreeLoRA)
    return made


def same_plan(a: SharingPlan, b: SharingPlan) -> bool:
    """Equal in every field, floats bit for bit (JSON keeps a float's shortest exact repr)."""
    return json.dumps(a.to_dict(), sort_keys=True) == json.dumps(b.to_dict(), sort_keys=True)


@pytest.mark.parametrize("external", ["mean", "per_cluster"])
@pytest.mark.parametrize("tau", [0.1, "auto"])
@pytest.mark.parametrize("cut_mode", CUT_MODES)
def test_the_strategys_plan_is_the_core_functions_plan(cut_mode: str, tau: float | str, external: str) -> None:
    d = hierarchy_distances()
    options = {"cut_mode": cut_mode, "tau": tau, "window": 3, "external": external, "max_clusters": 3,
               "fixed_clusters": 3, "linkage": "complete", "auto_level": 0.9, "auto_permutations": 199,
               "auto_seed": 4}  # fmt: skip
    plan = strategy(**options).plan_from_distances(d)
    auto = {"level": 0.9, "permutations": 199, "seed": 4}
    expected = ftl.plan_sharing(
        d, tau, 3, "complete", **auto, cut_mode=cut_mode, max_clusters=3 if external == "per_cluster" else None,
        fixed_clusters=3,
    )  # fmt: skip
    assert same_plan(plan, expected)
    assert np.array_equal(plan.labels, expected.labels) and np.array_equal(plan.tree, expected.tree)
    if external == "per_cluster":
        assert plan.cuts.max() <= 3
    # the comparison can tell the options apart: another seed, level or cap is another plan somewhere
    others = [
        ftl.plan_sharing(d, tau, 3, "average", **auto, cut_mode=cut_mode, fixed_clusters=2),
        ftl.plan_sharing(d, tau, 3, "complete", **auto, cut_mode=cut_mode, fixed_clusters=2, max_clusters=2),
    ]
    assert not any(same_plan(plan, other) for other in others)


def test_the_modes_cut_as_they_say() -> None:
    d = hierarchy_distances()
    one_tree = build_tree(d.mean(axis=0))
    tree = ftl.plan_sharing(d, 0.1, 3)
    assert tree.cuts.tolist() == [1, 1, 2, 2, 4, 4]
    assert same_plan(tree, ftl.plan_sharing(d, 0.1, 3, cut_mode="tree")), "tree is the default"
    for layer in range(LAYERS):
        assert np.array_equal(tree.labels[layer], cut_exact(one_tree, N, int(tree.cuts[layer])))

    fixed = ftl.plan_sharing(d, 0.1, 3, cut_mode="fixed", fixed_clusters=3)
    assert fixed.cuts.tolist() == [3] * LAYERS and fixed.scores == []
    assert all(np.array_equal(row, cut_exact(one_tree, N, 3)) for row in fixed.labels)
    assert ftl.plan_sharing(d, 0.1, 3, cut_mode="fixed", fixed_clusters=40).cuts.tolist() == [N] * LAYERS

    independent = ftl.plan_sharing(d, 0.1, 3, cut_mode="independent")
    assert np.array_equal(independent.tree, one_tree), "the layer-mean tree, kept for plotting"
    previous = 1
    for layer in range(LAYERS):
        c = int(independent.cuts[layer])
        assert np.array_equal(independent.labels[layer], cut_exact(build_tree(d[layer]), N, c)), "its own tree"
        assert min(independent.scores[layer]) == previous <= c, "the search starts at the previous count"
        previous = c


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"cut_mode": "layers"}, "cut_mode must be one of"),
        ({"cut_mode": "fixed"}, "needs fixed_clusters"),
        ({"cut_mode": "fixed", "fixed_clusters": 0}, "fixed_clusters must be an integer >= 1"),
        ({"cut_mode": "fixed", "fixed_clusters": 3, "max_clusters": 2}, "exceeds max_clusters"),
    ],
)
def test_a_bad_mode_or_count_is_refused_by_name(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ftl.plan_sharing(hierarchy_distances(), 0.1, 2, **kwargs)


def test_the_strategy_asks_for_its_plan_in_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """No search of its own: ``plan_from_distances`` hands the distances and its options to the core function."""
    import fedtreelora.strategies.fedtreelora as module

    calls: list[dict] = []
    real = module.plan_sharing

    def spy(*args: object, **kwargs: object) -> SharingPlan:
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "plan_sharing", spy)
    for mode in CUT_MODES:
        strategy(cut_mode=mode, fixed_clusters=2).plan_from_distances(hierarchy_distances())
    assert [c["cut_mode"] for c in calls] == list(CUT_MODES)
