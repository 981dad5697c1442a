"""Federations that change: the placement of a late client in the tree (by hand on small distance
matrices), who is present each round, the join/leave schedule's validation, and FedTreeLoRA's late
clients, departures and re-plans on hand-made uploads (no model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedtreelora.adapters import Site
from fedtreelora.config import load_config
from fedtreelora.core.placement import Membership, nearest_cluster, place_in_tree
from fedtreelora.core.structure import placement_agreement, planted_levels
from fedtreelora.errors import ConfigError
from fedtreelora.strategies import FederationContext, get_strategy

# --- the pure placement ------------------------------------------------------------------------------

#: five members over three layers: one trunk, two branches {0, 1, 2} / {3, 4}, then {0, 1} / {2} / {3, 4}
LABELS = np.array([[0, 0, 0, 0, 0], [0, 0, 0, 1, 1], [0, 0, 1, 2, 2]])


def test_nearest_cluster_is_the_smallest_average_distance_by_hand() -> None:
    labels = np.array([0, 0, 1, 1, 2])
    # averages: cluster 0 (1 + 5) / 2 = 3, cluster 1 (2 + 3) / 2 = 2.5, cluster 2: 2.6
    assert nearest_cluster(labels, np.array([1.0, 5.0, 2.0, 3.0, 2.6])) == 1
    # the single nearest member (1.0) is in cluster 0, but average linkage looks at the whole cluster
    assert nearest_cluster(labels, np.array([1.0, 5.0, 2.0, 3.0, 2.6]), candidates=np.array([0, 2])) == 2
    assert nearest_cluster(labels, np.array([1.0, 1.0, 1.0, 1.0, 9.0])) == 0, "a tie goes to the smaller id"


def test_place_in_tree_follows_the_nearest_branch_by_hand() -> None:
    # near 3 and 4 at every layer: trunk 0, branch 1, leaf 2
    d = np.tile([4.0, 4.0, 3.0, 0.5, 1.0], (3, 1))
    assert place_in_tree(LABELS, d).tolist() == [0, 1, 2]
    # near 2 alone: layer 1 averages {0,1,2} = (2 + 2 + 0.1) / 3 = 1.37 < {3,4} = 3, then leaf {2} (0.1) < {0,1} (2)
    d = np.tile([2.0, 2.0, 0.1, 3.0, 3.0], (3, 1))
    assert place_in_tree(LABELS, d).tolist() == [0, 0, 1]


def test_place_in_tree_respects_the_nesting_where_a_layer_alone_would_not() -> None:
    # layer 1 says branch {0,1,2} (average 1.0 against 2.0); layer 2 alone would pick leaf {3,4} (0.1)
    d = np.array(
        [
            [1.0, 1.0, 1.0, 1.0, 1.0],
            [1.0, 1.0, 1.0, 2.0, 2.0],
            [3.0, 3.0, 5.0, 0.1, 0.1],
        ]
    )
    nested = place_in_tree(LABELS, d)
    assert nested.tolist() == [0, 0, 0], "leaf {0, 1} (3.0) beats leaf {2} (5.0) inside branch 0"
    for layer in range(1, 3):  # the newcomer's cluster at l + 1 lies inside its cluster at l
        parents = {int(p) for p in LABELS[layer - 1][LABELS[layer] == nested[layer]]}
        assert parents == {int(nested[layer - 1])}
    assert place_in_tree(LABELS, d, nested=False).tolist() == [0, 0, 2], "each layer on its own"


def test_place_in_tree_checks_its_input() -> None:
    with pytest.raises(ValueError, match="not nested"):
        place_in_tree(np.array([[0, 0, 1], [0, 1, 1]]), np.ones((2, 3)))
    with pytest.raises(ValueError, match="equal"):
        place_in_tree(LABELS, np.ones((3, 4)))
    with pytest.raises(ValueError, match="no member"):
        place_in_tree(np.zeros((2, 0), dtype=int), np.zeros((2, 0)))


def test_placement_agreement_by_hand() -> None:
    # groups a/x a/y b/x; clients 0-2 a/x, 3 a/y, 4-5 b/x, newcomers 6 (a/x) and 7 (b/x)
    planted = planted_levels(["a/x", "a/x", "a/x", "a/y", "b/x", "b/x", "a/x", "b/x"])
    labels = np.array(
        [
            [0, 0, 0, 0, 1, 1, 0, 0],  # layer 0: 7 joins the a-cluster: 6 right, 7 wrong at both depths
            [0, 0, 0, 1, 2, 2, 0, 2],  # layer 1: both right
            [0, 0, 0, 1, 2, 2, 1, -1],  # layer 2: 6 joins {3} (a/y): right at depth 1, wrong at depth 2; 7 unplaced
        ]
    )
    got = placement_agreement(labels, planted, [6, 7])
    np.testing.assert_array_equal(got, [[0.5, 0.5], [1.0, 1.0], [1.0, 0.0]])
    alone = placement_agreement(np.array([[0, 0, 1]]), [["a", "a", "b"]], [2])
    assert np.isnan(alone).all(), "a newcomer alone in its cluster has no one to agree with"


def test_membership_present_by_round() -> None:
    m = Membership(4, join={2: 2}, leave={1: 3})
    assert [m.present(r) for r in range(4)] == [[0, 1, 3], [0, 1, 3], [0, 1, 2, 3], [0, 2, 3]]
    assert m.has_left(3, 1) and not m.has_left(2, 1) and m.changes
    assert not Membership(4).changes


# --- the schedule in the config ----------------------------------------------------------------------


def test_a_schedule_is_checked_with_the_key_and_the_fix() -> None:
    base = ["data.num_clients=4", "federation.rounds=6"]
    config = load_config(overrides=[*base, "federation.join={2: 4}", "federation.leave={1: 5}"])
    assert config.federation.join == {2: 4} and config.federation.leave == {1: 5}
    cases = {
        "federation.join={4: 2}": "federation.join names client 4",
        "federation.join={1: 7}": r"federation.join\[1\]=7 is outside rounds 1..6",
        "federation.leave={1: 1}": r"federation.leave\[1\]=1 is outside rounds 2..6",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_config(overrides=[*base, override])
    with pytest.raises(ConfigError, match=r"federation.leave\[2\]=3 is not after federation.join\[2\]=4"):
        load_config(overrides=[*base, "federation.join={2: 4}", "federation.leave={2: 3}"])
    with pytest.raises(ConfigError, match="no client takes part in round 1"):
        load_config(overrides=[*base, "federation.join={0: 2, 1: 2, 2: 2, 3: 2}"])


# --- FedTreeLoRA on hand-made uploads ------------------------------------------------------------------

N, LAYERS = 6, 3
SITES = tuple(Site(f"enc.{layer}.q", layer, "q", 3, 2) for layer in range(LAYERS))
# {0, 1, 2} near 0, {3, 4} near 5, separating with depth; client 5 joins late and resembles 3 and 4
PROFILES = {
    0: [0.0, 0.0, 0.0],
    1: [0.1, 0.2, 0.1],
    2: [0.05, 0.1, 0.2],
    3: [0.2, 5.0, 5.0],
    4: [0.1, 5.1, 5.2],
    5: [0.15, 4.9, 5.1],
}


def _context(membership: Membership, experts: tuple[str, ...] = ("cluster", "external")) -> FederationContext:
    shapes = {f"{s.name}.{e}.lora_{f}": ((1, 3) if f == "A" else (2, 1)) for s in SITES for e in experts for f in "AB"}
    return FederationContext(N, SITES, LAYERS, ("q",), 10, (10,) * N, 0, 1, shapes, membership=membership)


def _upload(b: list[float], a: float = 1.0) -> dict[str, torch.Tensor]:
    """A client's upload with B = b[layer] (times a fixed vector) at every layer, A = a."""
    out = {}
    for s in SITES:
        out[f"{s.name}.cluster.lora_A"] = torch.full((1, 3), a)
        out[f"{s.name}.cluster.lora_B"] = torch.tensor([[b[s.layer]], [b[s.layer] / 2]])
    return out


def test_a_late_client_warms_up_alone_then_joins_its_nearest_branch() -> None:
    cls = get_strategy("fedtreelora")
    strategy = cls(
        cls.Options(warmup_rounds=1, tau=0.2, window=3, join_warmup_rounds=2), _context(Membership(N, {5: 2}))
    )
    early = range(5)
    strategy.aggregate(0, {c: _upload(PROFILES[c]) for c in early})
    strategy.aggregate(1, {c: _upload(PROFILES[c]) for c in early})
    assert strategy.plan is not None and (strategy.plan.labels[:, 5] == -1).all()
    assert strategy.client_phase(2, 5).name == "warmup" and strategy.client_phase(2, 0).name != "warmup"
    assert strategy.payload(2, 5) == {}, "a late warm-up is local: nothing is received"
    before = strategy.payload(3, 3)["enc.2.q.cluster.lora_A"].clone()
    info = strategy.aggregate(2, {**{c: _upload(PROFILES[c]) for c in early}, 5: _upload(PROFILES[5], a=9.0)})
    assert info["late_warmup"] == [5] and "placed" not in info
    assert torch.equal(strategy.payload(3, 3)["enc.2.q.cluster.lora_A"], before), "its upload counts nowhere"
    assert strategy.client_phase(3, 5).name == "warmup", "two rounds of its own"
    info = strategy.aggregate(3, {**{c: _upload(PROFILES[c]) for c in early}, 5: _upload(PROFILES[5], a=9.0)})
    assert info["placed"] == [5]
    labels = strategy.plan.labels
    assert (labels[:, 5] == labels[:, 3]).all(), "placed in the branch of the clients it resembles"
    assert strategy.placements == [{"client": 5, "round": 3, "joined": 2, "labels": labels[:, 5].tolist()}]
    assert strategy.summary()["placements"] == strategy.placements
    assert strategy.client_phase(4, 5).name != "warmup"
    received = strategy.payload(4, 5)
    assert torch.equal(received["enc.2.q.cluster.lora_A"], torch.ones(1, 3)), "its cluster's mean, without itself"
    assert torch.equal(received["enc.2.q.external.lora_A"], torch.ones(1, 3))


def test_a_late_client_can_start_from_the_trunk() -> None:
    cls = get_strategy("fedtreelora")
    options = cls.Options(warmup_rounds=1, tau=0.2, window=3, join_warmup_rounds=2, join_start="trunk")
    strategy = cls(options, _context(Membership(N, {5: 2})))
    strategy.aggregate(0, {c: _upload(PROFILES[c]) for c in range(5)})
    assert 0 in strategy.shared_by_all(), "layer 0 is the trunk"
    start = strategy.payload(2, 5)
    assert set(start) == {"enc.0.q.cluster.lora_A", "enc.0.q.cluster.lora_B"}, "the trunk's cluster expert only"
    assert torch.equal(start["enc.0.q.cluster.lora_A"], strategy.payload(2, 0)["enc.0.q.cluster.lora_A"])
    strategy.aggregate(1, {c: _upload(PROFILES[c]) for c in range(5)})  # 5 not sampled: the start waits
    assert strategy.payload(2, 5)
    strategy.aggregate(2, {5: _upload(PROFILES[5])})
    assert strategy.payload(3, 5) == {}, "once trained with, the start is its own"


def test_a_client_that_left_counts_in_no_share_and_an_emptied_cluster_has_no_expert() -> None:
    cls = get_strategy("fedtreelora")
    deep = LAYERS - 1
    for external in ("mean", "per_cluster"):
        options = cls.Options(warmup_rounds=1, tau=0.2, window=3, external=external, max_clusters=3)
        experts = cls.experts_for(options)
        other = "other_1" if external == "per_cluster" else "external"
        # 3 and 4 take part up to round 1; from round 2 on, 5 alone is left of their cluster
        strategy = cls(options, _context(Membership(N, leave={3: 2, 4: 2}), experts))
        strategy.aggregate(0, {c: _upload(PROFILES[c]) for c in range(N)})
        labels = strategy.plan.labels
        assert labels[deep, 3] == labels[deep, 4] == labels[deep, 5] != labels[deep, 0]
        strategy.aggregate(1, {c: _upload(PROFILES[c]) for c in range(N)})
        strategy.aggregate(2, {c: _upload(PROFILES[c]) for c in (0, 1, 2, 5)})
        b = strategy.payload(3, 0)[f"enc.{deep}.q.{other}.lora_B"]
        assert torch.allclose(b, _upload(PROFILES[5])[f"enc.{deep}.q.cluster.lora_B"]), "5 alone, at full share"
        # the whole cluster goes: the others get no expert from it (zero), nothing breaks
        strategy = cls(options, _context(Membership(N, leave={3: 2, 4: 2, 5: 2}), experts))
        strategy.aggregate(0, {c: _upload(PROFILES[c]) for c in range(N)})
        strategy.aggregate(1, {c: _upload(PROFILES[c]) for c in range(N)})
        assert strategy.payload(2, 0)[f"enc.{deep}.q.{other}.lora_B"].abs().sum() > 0
        strategy.aggregate(2, {c: _upload(PROFILES[c]) for c in range(3)})
        for c in range(3):
            payload = strategy.payload(3, c)
            assert all(torch.isfinite(v).all() for v in payload.values())
            assert payload[f"enc.{deep}.q.{other}.lora_B"].abs().sum() == 0, external


def test_a_replan_rebuilds_the_tree_from_the_latest_uploads_and_keeps_every_plan() -> None:
    cls = get_strategy("fedtreelora")
    strategy = cls(
        cls.Options(warmup_rounds=1, tau=0.2, window=3, replan_every=2, replan_from="uploads"), _context(Membership(N))
    )
    strategy.aggregate(0, {c: _upload(PROFILES[c]) for c in range(N)})
    first = strategy.plan.labels.copy()
    info = strategy.aggregate(1, {c: _upload(PROFILES[c]) for c in range(N)})
    assert "replanned" not in info
    swapped = dict(PROFILES)  # the groups change: clients 0 and 5 trade places
    swapped[0], swapped[5] = PROFILES[5], PROFILES[0]
    info = strategy.aggregate(2, {c: _upload(swapped[c]) for c in range(N)})
    assert info["replanned"] == strategy.plan.cuts.tolist()
    deep = LAYERS - 1
    assert first[deep, 0] == first[deep, 1] and first[deep, 0] != first[deep, 3]
    now = strategy.plan.labels
    assert now[deep, 0] == now[deep, 3] != now[deep, 1] == now[deep, 5], "the tree follows the new groups"
    assert [p["round"] for p in strategy.summary()["plans"]] == [0, 2]
    tensors, meta = strategy.state_dict()
    again = cls(strategy.options, strategy.context)
    again.load_state_dict(tensors, meta)
    assert again.plans == strategy.plans and again.summary() == strategy.summary()


def _upload_b(b: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A client's upload with B = b[layer] (a (2,) vector as the (2, 1) factor) and A = 1."""
    out = {}
    for s in SITES:
        out[f"{s.name}.cluster.lora_A"] = torch.ones(1, 3)
        out[f"{s.name}.cluster.lora_B"] = b[s.layer].reshape(2, 1).clone()
    return out


def _drift_strategy(replan_from: str, replan_every: int = 1):  # type: ignore[no-untyped-def]
    """FedTreeLoRA after a one-round warm-up over two groups far apart in B ({0, 1, 2} near (5, 0),
    {3, 4, 5} near (0, 5)), planned into those two clusters at the deepest layer."""
    cls = get_strategy("fedtreelora")
    options = cls.Options(warmup_rounds=1, tau=0.2, window=3, replan_every=replan_every, replan_from=replan_from)
    strategy = cls(options, _context(Membership(N)))
    jitter = {c: torch.tensor([0.01 * c, -0.02 * c]) for c in range(N)}
    near_a, near_b = torch.tensor([5.0, 0.0]), torch.tensor([0.0, 5.0])
    strategy.aggregate(
        0,
        {
            c: _upload_b({layer: (near_b if c >= 3 else near_a) + jitter[c] for layer in range(LAYERS)})
            for c in range(N)
        },
    )
    deep = strategy.plan.labels[LAYERS - 1]
    assert deep[0] == deep[1] == deep[2] != deep[3] == deep[4] == deep[5]
    return strategy


def _learn(strategy, rnd: int, directions: dict[int, torch.Tensor]) -> dict:  # type: ignore[no-untyped-def]
    """One federated round: each client uploads the B it received plus its own step (``directions[c]``,
    the same at every layer) and a small client-specific wobble; returns the aggregation's info."""
    uploads = {}
    for c in range(N):
        payload = strategy.payload(rnd, c)
        wobble = torch.tensor([0.003 * c, 0.002 * (N - c)])
        uploads[c] = _upload_b(
            {s.layer: payload[f"{s.name}.cluster.lora_B"].flatten() + directions[c] + wobble for s in SITES}
        )
    return strategy.aggregate(rnd, uploads)


#: each group keeps learning along its cluster's B; after the drift client 2 learns along the other
#: group's, while its B stays near its old cluster's
LEARN_A, LEARN_B = torch.tensor([0.5, 0.0]), torch.tensor([0.0, 0.5])
#: (client 2 unlearns its old cluster's direction; client 0 leans toward the other group's but still
#: learns along its own, so it stays)
DRIFTED = {0: torch.tensor([0.3, 0.4]), 1: LEARN_A, 2: torch.tensor([-0.3, 0.5]), 3: LEARN_B, 4: LEARN_B, 5: LEARN_B}


def test_update_alignment_is_one_minus_the_cosine_by_hand() -> None:
    from fedtreelora.strategies.common import update_alignment

    context = _context(Membership(N))
    update = _upload_b({0: torch.tensor([1.0, 0.0]), 1: torch.tensor([0.0, 2.0]), 2: torch.tensor([3.0, 4.0])})
    experts = {
        7: _upload_b({0: torch.tensor([1.0, 1.0]), 1: torch.tensor([0.0, -1.0]), 2: torch.tensor([4.0, -3.0])}),
        9: _upload_b({0: torch.tensor([2.0, 0.0]), 1: torch.tensor([0.0, 0.0]), 2: torch.tensor([-3.0, -4.0])}),
    }
    got = update_alignment(update, experts, [9, 7], context, "cluster")
    # columns in the order of members: 9 then 7; a zero expert counts as orthogonal (1.0)
    np.testing.assert_allclose(got, [[0.0, 1 - 2**-0.5], [1.0, 2.0], [2.0, 1.0]], atol=1e-12)


def test_a_replan_from_updates_follows_a_client_whose_data_changed() -> None:
    deep = LAYERS - 1
    by_updates = _drift_strategy("updates")
    info = _learn(by_updates, 1, DRIFTED)
    assert info["replanned"] == by_updates.plan.cuts.tolist()
    now = by_updates.plan.labels[deep]
    assert now[2] == now[3] == now[4] == now[5] != now[0] == now[1], "the drifted client joins the group it learns with"
    assert by_updates.plan.cuts[deep] == 2 and [p["round"] for p in by_updates.plans] == [0, 1]
    # the same round re-planned from the uploaded B: client 2's B is its old cluster's mean plus one step
    by_uploads = _drift_strategy("uploads")
    _learn(by_uploads, 1, DRIFTED)
    old = by_uploads.plan.labels[deep]
    assert old[2] == old[0] == old[1] != old[3], "the latest B keeps it where the shared start put it"


def test_updates_sum_over_the_rounds_since_the_last_plan_and_survive_a_checkpoint() -> None:
    deep = LAYERS - 1
    strategy = _drift_strategy("updates", replan_every=2)
    # round 1 (no re-plan yet): client 2 still learns with its group; round 2: it unlearns it twice as
    # hard, so the sum of its two updates points away from its expert and along the other group's
    steady = {c: (LEARN_B if c >= 3 else LEARN_A) for c in range(N)}
    assert "replanned" not in _learn(strategy, 1, steady)
    sums = {c: strategy._updates_b[c][f"enc.{deep}.q.cluster.lora_B"].flatten() for c in range(N)}
    torch.testing.assert_close(sums[0], LEARN_A + torch.tensor([0.0, 0.012]), rtol=0, atol=1e-6)
    tensors, meta = strategy.state_dict()
    resumed = get_strategy("fedtreelora")(strategy.options, strategy.context)
    resumed.load_state_dict(tensors, meta)
    stronger = {**DRIFTED, 2: torch.tensor([-1.0, 1.0])}
    for run in (strategy, resumed):
        info = _learn(run, 2, stronger)
        assert info["replanned"] == run.plan.cuts.tolist()
        now = run.plan.labels[deep]
        assert now[2] == now[3] != now[0], (
            "learned (0.5, 0) then (-1, 1): the sum points away from (5, 0), along (0, 5)"
        )
        assert run._updates_b == {}, "a plan empties the sums"
    np.testing.assert_array_equal(resumed.plan.labels, strategy.plan.labels)
    assert resumed.plans == strategy.plans


def test_participants_are_sampled_among_the_clients_present() -> None:
    from fedtreelora.engines import SimulationEngine

    config = load_config(overrides=["data.num_clients=6", "federation.fraction_train=0.5"])
    engine = SimulationEngine(config, quiet=True)
    everyone = [engine.participants(r, 6) for r in range(8)]
    assert everyone == [engine.participants(r, 6, list(range(6))) for r in range(8)], "no schedule: as before"
    present = [0, 2, 3, 5]
    for r in range(8):
        chosen = engine.participants(r, 6, present)
        assert len(chosen) == 2 and set(chosen) <= set(present)
        assert chosen == engine.participants(r, 6, present), "fixed by the seed and round"


def test_the_report_names_each_replans_deepest_clusters() -> None:
    from fedtreelora.report.render import deepest

    plan = {"round": 4, "cuts": [1, 2], "labels": [[0, 0, 0, 0, -1], [0, 1, 0, 1, -1]]}
    assert deepest(plan) == "deepest layer {0, 2} {1, 3}", "client 4 is not placed"
