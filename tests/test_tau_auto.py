"""``tau = "auto"``: each layer's cut chosen by a relabelling test, on synthetic B matrices and distances."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

import fedtreelora as ftl
from fedtreelora.core import batch_mean_silhouette, cut_exact, mean_silhouette
from fedtreelora.core.structure import ari_by_layer
from fedtreelora.core.tau_auto import RelabellingTest, check_auto_settings
from fedtreelora.core.tree import build_tree
from fedtreelora.strategies import FederationContext, get_strategy
from fedtreelora.strategies.fedtreelora import FedTreeLoRAOptions

FEATURES = (2, 16, 4)  # modules, d_out, rank


def noise_b(seed: int, n: int, layers: int = 6) -> np.ndarray:
    """Every client's B drawn from one distribution: no structure at any layer."""
    return np.random.default_rng(seed).normal(size=(n, layers, *FEATURES))


def planted_b(seed: int, groups: np.ndarray, layers: range, n_layers: int = 6, sep: float = 2.0) -> np.ndarray:
    """Noise everywhere, plus one mean per group (``sep`` per entry) at ``layers``."""
    rng = np.random.default_rng(seed)
    b = rng.normal(size=(len(groups), n_layers, *FEATURES))
    for layer in layers:
        b[:, layer] += rng.normal(scale=sep, size=(groups.max() + 1, *FEATURES))[groups]
    return b


def hierarchy_b(seed: int, n: int = 16, sep: float = 2.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Layers 0-1 alike; 2 groups from layer 2 on; each split in two more from layer 4 on (4 groups)."""
    rng = np.random.default_rng(seed)
    two, four = np.arange(n) * 2 // n, np.arange(n) * 4 // n
    b = rng.normal(size=(n, 6, *FEATURES))
    for layer in range(2, 6):
        b[:, layer] += rng.normal(scale=sep, size=(2, *FEATURES))[two]
        if layer >= 4:
            b[:, layer] += rng.normal(scale=sep, size=(4, *FEATURES))[four]
    return b, two, four


def is_refinement(fine: np.ndarray, coarse: np.ndarray) -> bool:
    return all(len(set(coarse[fine == c])) == 1 for c in np.unique(fine))


def old_plan(d: np.ndarray, tau: float, window: int) -> tuple[np.ndarray, np.ndarray, list[dict[int, float]]]:
    """The numeric-tau rule, written out independently: what plan_sharing computed before ``auto``."""
    n_layers, n, _ = d.shape
    tree = build_tree(d.mean(axis=0))
    previous, cuts, labels, scores = 1, [], [], []
    for layer in range(n_layers):
        layer_scores, best_c, best = {}, previous, -np.inf
        for c in range(previous, max(previous + 1, min(n, previous + window))):
            score = tau if c == 1 else mean_silhouette(d[layer], cut_exact(tree, n, c))
            layer_scores[c] = score
            if score > best:
                best_c, best = c, score
        cuts.append(best_c)
        labels.append(cut_exact(tree, n, best_c))
        scores.append(layer_scores)
        previous = best_c
    return np.array(cuts), np.array(labels), scores


# --- (a) no structure: every layer shared ------------------------------------------------------------------
@pytest.mark.parametrize(("n", "window"), [(12, 3), (20, 2)])
def test_clients_from_one_distribution_stay_shared_in_at_least_95_percent_of_seeds(n: int, window: int) -> None:
    shared = [
        ftl.plan_sharing(ftl.layer_distances(noise_b(seed, n)), "auto", window).cuts.max() == 1 for seed in range(40)
    ]
    assert np.mean(shared) >= 0.95


# --- (b) planted groups are found from the depth they appear -----------------------------------------------
@pytest.mark.parametrize(("n", "k"), [(12, 2), (16, 4), (20, 4)])
@pytest.mark.parametrize("seed", range(3))
def test_planted_groups_are_recovered_from_their_depth_on(n: int, k: int, seed: int) -> None:
    groups = np.arange(n) % k
    d = ftl.layer_distances(planted_b(seed, groups, range(3, 6)))
    plan = ftl.plan_sharing(d, "auto", window=k)  # window k reaches k clusters in one step
    assert plan.cuts.tolist() == [1, 1, 1, k, k, k]
    ari = ari_by_layer(plan.labels, [groups.tolist()])[:, 0]
    assert np.all(ari[3:] == 1.0)


@pytest.mark.parametrize("seed", range(3))
def test_two_level_hierarchy_is_recovered_level_by_level(seed: int) -> None:
    b, two, four = hierarchy_b(seed)
    d = ftl.layer_distances(b)
    plan = ftl.plan_sharing(d, "auto", window=3)
    assert plan.cuts.tolist() == [1, 1, 2, 2, 4, 4]
    ari = ari_by_layer(plan.labels, [two.tolist(), four.tolist()])
    assert np.all(ari[2:4, 0] == 1.0) and np.all(ari[4:, 1] == 1.0)
    # With window 2 the cut can grow by one per layer: 3 clusters at layer 4 (all it can reach), 4 at layer 5.
    narrow = ftl.plan_sharing(d, "auto", window=2)
    assert narrow.cuts.tolist() == [1, 1, 2, 2, 3, 4]
    assert ari_by_layer(narrow.labels, [four.tolist()])[5, 0] == 1.0


def test_a_finer_cut_must_pass_its_own_test() -> None:
    """Two real groups from layer 3 on: deeper layers are offered 3 clusters but none is admitted,
    because splitting a group adds nothing that random relabellings within it do not."""
    groups = np.arange(12) % 2
    plan = ftl.plan_sharing(ftl.layer_distances(planted_b(0, groups, range(3, 6))), "auto", window=3)
    for layer in (4, 5):
        assert set(plan.null_quantiles[layer]) == {3, 4}
        assert plan.admissible[layer] == []


# --- (c) nesting and the window hold ------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(25))
@pytest.mark.parametrize("window", [1, 2, 3, 5])
def test_auto_keeps_nesting_and_the_window(seed: int, window: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 15))
    b = rng.normal(size=(n, 5, 1, 4, 2)) * np.linspace(0.2, 2.0, 5)[None, :, None, None, None]
    groups = rng.integers(0, 3, size=n)
    b[:, 2:] += rng.normal(scale=float(rng.uniform(0, 3)), size=(3, 1, 4, 2))[groups][:, None]
    plan = ftl.plan_sharing(ftl.layer_distances(b), "auto", window, permutations=99, seed=seed)
    previous = 1
    for layer in range(5):
        c = int(plan.cuts[layer])
        assert previous <= c < previous + window and c < max(n, 2)
        assert len(np.unique(plan.labels[layer])) == c
        assert c == previous or c in plan.admissible[layer], "a finer cut only when admissible"
        tested = [k for k in range(previous + 1, min(n, previous + window))]
        assert sorted(plan.null_quantiles[layer]) == sorted(plan.test_scores[layer]) == tested
        assert 1 not in plan.scores[layer], "one cluster has no score under auto"
        for k in plan.admissible[layer]:  # passes here and at every deeper layer of the same stage
            for deeper in range(layer, 5):
                if deeper == layer or plan.cuts[deeper - 1] == previous:
                    assert plan.test_scores[deeper][k] > plan.null_quantiles[deeper][k]
        if layer:
            assert is_refinement(plan.labels[layer], plan.labels[layer - 1])
        previous = c


@pytest.mark.parametrize("n", [1, 2])
def test_one_or_two_clients_share_everything(n: int) -> None:
    plan = ftl.plan_sharing(ftl.layer_distances(noise_b(0, n, 3)), "auto", window=5)
    assert plan.cuts.tolist() == [1, 1, 1] and not plan.labels.any()
    assert plan.null_quantiles == [{}, {}, {}]


def test_a_single_layer_has_nothing_to_test_against() -> None:
    groups = np.arange(12) % 2
    plan = ftl.plan_sharing(ftl.layer_distances(planted_b(0, groups, range(1), n_layers=1, sep=5.0)), "auto", 3)
    assert plan.cuts.tolist() == [1] and plan.null_quantiles == [{}]


def test_tiny_clusters_are_tested_by_rotation_and_split_when_grouped() -> None:
    """Six clients in two planted groups of three: only 10 distinct relabellings exist (a perfect split
    would have a relabelling p-value of 1/10 and never pass at level 0.95), so each layer's null rotates
    the clients within the parent instead, and the planted split is found in every layer."""
    groups = np.arange(6) % 2
    d = ftl.layer_distances(planted_b(0, groups, range(6), sep=5.0))
    plan = ftl.plan_sharing(d, "auto", 2)
    assert plan.cuts.tolist() == [2] * 6
    assert np.all(ari_by_layer(plan.labels, [groups.tolist()])[:, 0] == 1.0)


@pytest.mark.parametrize("window", [2, 3])
def test_small_federations_without_groups_stay_shared(window: int) -> None:
    """Six and eight i.i.d. clients, where every candidate has fewer than 40 distinct relabellings and the
    rotation null decides: at most 5% of federations may split (10% allows Monte Carlo slack)."""
    for n in (6, 8):
        split = [
            ftl.plan_sharing(ftl.layer_distances(noise_b(seed, n)), "auto", window, permutations=199).cuts.max() > 1
            for seed in range(40)
        ]
        assert np.mean(split) <= 0.10, n


def test_distinct_partitions_counts_partitions_not_label_vectors() -> None:
    """Hand counts: 3 + 3 of six clients C(6,3)/2 = 10; 2 + 2 + 2 of six 6!/(2!^3 3!) = 15; 4 + 4 of eight
    C(8,4)/2 = 35; within a parent {0,1,2,3 | 4,5,6,7}, the cut {0,1 | 2,3 | 4,5,6,7} has C(4,2)/2 = 3."""
    from fedtreelora.core.tau_auto import distinct_partitions

    rng = np.random.default_rng(0)
    six = np.array([rng.permutation(6) for _ in range(999)])
    eight = np.array([rng.permutation(8) for _ in range(999)])
    assert distinct_partitions(np.array([0, 0, 0, 1, 1, 1])[six]) == 10
    assert distinct_partitions(np.array([2, 2, 0, 0, 1, 1])[six]) == 15
    assert distinct_partitions(np.array([1, 1, 1, 1, 0, 0, 0, 0])[eight]) == 35
    within = np.concatenate([rng.permuted(np.tile(np.arange(4), (999, 1)), axis=1), 4 + np.zeros((999, 4), int)], 1)
    assert distinct_partitions(np.array([0, 0, 1, 1, 2, 2, 2, 2])[within]) == 3


def test_rotated_distances_start_with_the_observed_ones_and_keep_parent_means() -> None:
    from fedtreelora.core.tau_auto import rotated_distances

    points = np.random.default_rng(0).normal(size=(7, 5))
    d = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1))
    parent = np.array([0, 0, 0, 1, 1, 1, 1])
    out = rotated_distances(d, parent, 20, (0,))
    assert out.shape == (21, 7, 7) and np.allclose(out[0], d)
    assert not np.allclose(out[1], d)
    # Distance between the two parent clusters' means is kept by every rotation.
    for draw in out:
        sq = draw**2
        between = sq[:3, 3:].mean() - 0.5 * (sq[:3, :3].mean() + sq[3:, 3:].mean())
        assert np.isclose(between, ((points[:3].mean(0) - points[3:].mean(0)) ** 2).sum())


# --- (d) determinism, and numbers unchanged ------------------------------------------------------------------
def test_same_input_same_plan() -> None:
    b, _, _ = hierarchy_b(1)
    d = ftl.layer_distances(b)
    first = ftl.plan_sharing(d, "auto", 3).to_dict()
    assert json.dumps(first) == json.dumps(ftl.plan_sharing(d.copy(), "auto", 3).to_dict())
    assert first["auto"] == {"level": 0.95, "permutations": 999, "seed": 0}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tau", [-1.0, 0.0, 0.1, 0.3])
@pytest.mark.parametrize("window", [1, 2, 4])
def test_a_number_gives_exactly_the_old_plan(seed: int, tau: float, window: int) -> None:
    rng = np.random.default_rng(seed)
    b = rng.normal(size=(9, 5, 2, 4, 2)) * np.linspace(0.2, 2.0, 5)[None, :, None, None, None]
    d = ftl.layer_distances(b)
    plan = ftl.plan_sharing(d, tau, window)
    cuts, labels, scores = old_plan(d, tau, window)
    assert np.array_equal(plan.cuts, cuts) and np.array_equal(plan.labels, labels) and plan.scores == scores
    assert plan.tau == tau and plan.null_quantiles == [] and plan.admissible == [] and plan.auto == {}


def test_batched_silhouette_matches_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    points = rng.normal(size=(10, 3))
    points[3] = points[2]  # a zero distance between different clients
    d = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1))
    rows = [rng.permutation(np.arange(10) % 3), np.array([0, 1, 2, 2, 2, 2, 2, 2, 2, 2]), np.array([0] * 9 + [1])]
    for row in rows:
        assert batch_mean_silhouette(d, row[None])[0] == pytest.approx(mean_silhouette(d, row), abs=1e-12)


def test_plan_round_trips_and_old_dicts_still_load() -> None:
    b, _, _ = hierarchy_b(0)
    plan = ftl.plan_sharing(ftl.layer_distances(b), "auto", 3)
    again = ftl.SharingPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.tau == "auto" and again.null_quantiles == plan.null_quantiles
    assert again.test_scores == plan.test_scores and again.admissible == plan.admissible and again.auto == plan.auto
    assert np.array_equal(again.labels, plan.labels) and again.scores == plan.scores
    old = {k: v for k, v in ftl.plan_sharing(ftl.layer_distances(b), 0.2, 3).to_dict().items()}
    for key in ("null_quantiles", "test_scores", "admissible", "auto"):
        del old[key]
    loaded = ftl.SharingPlan.from_dict(old)
    assert loaded.tau == 0.2 and loaded.null_quantiles == [] and loaded.auto == {}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tau": "automatic"}, "tau must be a number in"),
        ({"tau": "auto", "level": 1.0}, r"level must be a number in \(0, 1\)"),
        ({"tau": "auto", "permutations": 0}, "permutations must be an integer"),
        ({"tau": "auto", "permutations": 10}, "too few for level=0.95: the level quantile needs at least 19"),
    ],
)
def test_bad_auto_settings_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ftl.plan_sharing(np.zeros((2, 4, 4)), window=2, **{"tau": 0.0, **kwargs})
    assert check_auto_settings(0.95, 19) == (0.95, 19)


# --- (e) speed ---------------------------------------------------------------------------------------------
def test_twenty_clients_by_thirty_two_layers_plan_quickly() -> None:
    groups = np.arange(20) % 4
    d = ftl.layer_distances(planted_b(0, groups, range(12, 32), n_layers=32))
    started = time.perf_counter()
    plan = ftl.plan_sharing(d, "auto", 3)
    elapsed = time.perf_counter() - started
    assert plan.cuts[:12].max() == 1 and plan.cuts[-1] == 4
    print(f"auto plan, 20 clients x 32 layers, window 3, 999 relabellings: {elapsed:.3f} s")


# --- the strategy --------------------------------------------------------------------------------------------
def strategy(n: int = 12, **options: object):  # type: ignore[no-untyped-def]
    from fedtreelora.adapters import Site

    sites = tuple(Site(f"enc.{layer}.q", layer, "q", 3, 2) for layer in range(6))
    context = FederationContext(n, sites, 6, ("q",), 4, (10,) * n, 0, 1, {})
    return get_strategy("fedtreelora")(FedTreeLoRAOptions(**options), context)


def test_options_accept_auto_and_validate_its_settings() -> None:
    assert FedTreeLoRAOptions(tau="auto").tau == "auto" and FedTreeLoRAOptions().tau == 0.1
    for bad in ({"tau": "always"}, {"tau": 2.0}, {"auto_level": 1.0}, {"auto_permutations": 10}):
        with pytest.raises(ValueError):
            FedTreeLoRAOptions(**bad)


def test_strategy_plans_with_auto_in_every_cut_mode_and_keeps_it_through_state() -> None:
    groups = np.arange(12) % 2
    d = ftl.layer_distances(planted_b(0, groups, range(3, 6)))
    tree = strategy(tau="auto", window=3)
    plan = tree.plan_from_distances(d)
    assert plan.cuts.tolist() == [1, 1, 1, 2, 2, 2] and plan.tau == "auto" and plan.null_quantiles[0]
    independent = strategy(tau="auto", window=3, cut_mode="independent").plan_from_distances(d)
    assert independent.cuts.tolist() == [1, 1, 1, 2, 2, 2] and independent.null_quantiles[0]
    assert np.all(ari_by_layer(independent.labels, [groups.tolist()])[3:, 0] == 1.0)
    noise = ftl.layer_distances(noise_b(0, 12))
    assert strategy(tau="auto", cut_mode="independent").plan_from_distances(noise).cuts.max() == 1
    fixed = strategy(tau="auto", cut_mode="fixed", fixed_clusters=3).plan_from_distances(d)
    assert fixed.cuts.tolist() == [3] * 6
    capped = strategy(tau="auto", window=4, external="per_cluster", max_clusters=2)
    four = np.arange(12) % 4
    capped_plan = capped.plan_from_distances(ftl.layer_distances(planted_b(0, four, range(3, 6))))
    # Only two clusters are ever tested (the cap), and kept only where admitted (see the cap's own test).
    assert capped_plan.cuts.max() <= 2 and set(capped_plan.null_quantiles[3]) == {2}
    # Checkpoints keep the plan with its tests (through JSON, as the checkpoint writes it).
    tree.plan = plan
    tensors, meta = tree.state_dict()
    restored = strategy(tau="auto", window=3)
    restored.load_state_dict(tensors, json.loads(json.dumps(meta)))
    assert restored.plan is not None and restored.plan.null_quantiles == plan.null_quantiles
    assert restored.summary()["plan"]["null_quantiles"] == meta["plan"]["null_quantiles"]


def test_report_shows_each_candidate_with_its_null_quantile(tmp_path: Path) -> None:
    from fedtreelora.report import load_run
    from fedtreelora.report.render import cut_search_rows, overview_rows, write_report

    b, _, _ = hierarchy_b(0)
    plan = ftl.plan_sharing(ftl.layer_distances(b), "auto", 3).to_dict()
    history = [{"round": 0, "phase": "federated", "mean_accuracy": 0.5}]
    summary = {"method": "fedtreelora", "num_clients": 16, "per_client": [0.5] * 16, "history": history}
    (tmp_path / "summary.json").write_text(json.dumps({**summary, "cuts": plan["cuts"], "plan": plan}))
    run = load_run(tmp_path)
    header, rows = cut_search_rows(run)  # type: ignore[misc]
    assert header[-4:] == ["tested silhouette", "null quantile", "passes here", "admissible"]
    layer2 = {row[2]: row for row in rows if row[0] == "2"}
    assert layer2["2 (kept)"][5] == f"{plan['null_quantiles'][2]['2']:.3f}" and layer2["2 (kept)"][7] == "yes"
    assert layer2["3"][7] == "yes", "admissible (it holds the two groups) but its silhouette is lower"
    layer0 = {row[2]: row for row in rows if row[0] == "0"}
    assert layer0["2"][1] == "1" and layer0["2"][6:] == ["no", "no"]
    assert ("tau, window", "auto (level 0.95, 999 relabellings, seed 0), 3") in overview_rows(run)
    _, md_path = write_report(tmp_path)
    text = md_path.read_text()
    assert "## Cut search per layer" in text and "null quantile" in text
    numeric = ftl.plan_sharing(ftl.layer_distances(b), 0.3, 3).to_dict()
    (tmp_path / "summary.json").write_text(json.dumps({**summary, "cuts": numeric["cuts"], "plan": numeric}))
    header, rows = cut_search_rows(load_run(tmp_path))  # type: ignore[misc]
    assert header == ["layer", "clusters kept", "candidate", "silhouette"] and rows[0][3] == "tau 0.300"


@pytest.mark.slow
def test_tiny_run_with_auto_records_the_plan_with_null_quantiles(tmp_path: Path, one_thread: None) -> None:
    from fedtreelora.config import load_config
    from fedtreelora.engines import SimulationEngine

    overrides = [
        "model.num_layers=2",
        "data.num_clients=4",
        "data.n_train=16",
        "data.n_val=16",
        "train.batch_size=16",
        "federation.rounds=2",
        "fedtreelora.warmup_rounds=1",
        "fedtreelora.tau=auto",
        "logging.tensorboard=false",
    ]
    summary = SimulationEngine(load_config(overrides=overrides), tmp_path, quiet=True, report=False).run()
    plan = summary["plan"]
    assert plan["tau"] == "auto" and plan["auto"]["level"] == 0.95
    # Four clients: window 2 offers two clusters at each layer, and the plan records its test there.
    assert [sorted(layer) for layer in plan["null_quantiles"]] == [["2"], ["2"]]
    assert summary["cuts"] == plan["cuts"] and len(plan["test_scores"]) == 2
    saved = json.loads((tmp_path / "summary.json").read_text())["plan"]
    assert ftl.SharingPlan.from_dict(saved).null_quantiles == ftl.SharingPlan.from_dict(plan).null_quantiles


# --- (f) clients that differ in every layer without forming groups -------------------------------------------
def trait_b(seed: int, n: int = 12, layers: int = 6, offset: float = 0.0, sigma: float = 0.0) -> np.ndarray:
    """No groups: per layer a common B plus noise, and a per-client trait shown in every layer: an
    offset (``offset`` per entry, the same at all layers) or a B scale (lognormal, ``sigma``)."""
    rng = np.random.default_rng(seed)
    b = rng.normal(size=(1, layers, *FEATURES)) + rng.normal(size=(n, layers, *FEATURES))
    b = b + offset * rng.normal(size=(n, 1, *FEATURES))
    return b * np.exp(sigma * rng.normal(size=(n, 1, 1, 1, 1)))


TRAIT_LIMIT = pytest.mark.xfail(
    strict=True,
    reason="a long-tailed spread of per-client B scales (lognormal sigma 0.5: scales e^-1..e^1) reads as a "
    "group of large clients; about a third of such federations split (core/tau_auto.py, the guarantee)",
)


@pytest.mark.parametrize(
    ("offset", "sigma"), [(1.0, 0.0), (2.0, 0.0), (0.0, 0.25), pytest.param(0.0, 0.5, marks=TRAIT_LIMIT)]
)
def test_clients_with_traits_in_every_layer_but_no_groups_stay_shared(offset: float, sigma: float) -> None:
    """A per-client offset or scale that every layer shows makes clients differ consistently, not form
    groups: at level 0.95 at most 5% of such federations may split (10% allows Monte Carlo slack)."""
    split = [
        ftl.plan_sharing(
            ftl.layer_distances(trait_b(seed, offset=offset, sigma=sigma)), "auto", 3, permutations=199
        ).cuts.max()
        > 1
        for seed in range(40)
    ]
    assert np.mean(split) <= 0.10


def test_real_adapters_are_recognised_as_grouped_and_splits_follow_the_groups() -> None:
    """B-matrix distances of 12 real clients in planted groups (tests/data): the clients' pooled structure
    is grouped at the planted number of leaves, and any split auto makes agrees with the planted leaves
    more than chance."""
    data = np.load(Path(__file__).parent / "data" / "fixture_h12_lr1e-3.npz")
    d, leaves = data["distances"], data["groups_depth2"]
    n_leaves = len(np.unique(leaves))
    test = RelabellingTest(d)
    assert test.grouped(np.zeros(d.shape[1], dtype=np.int64), 0, list(range(2, n_leaves + 1)))
    for window in (2, n_leaves):
        plan = ftl.plan_sharing(d, "auto", window)
        ari = ari_by_layer(plan.labels, [leaves.tolist()])[:, 0]
        assert np.all(ari[plan.cuts > 1] > 0)
        print(f"real adapters, window {window}: cuts {plan.cuts.tolist()}, ARI with the leaves {np.round(ari, 2)}")


def test_rotations_keep_each_cluster_mean_and_spread_but_mix_its_clients() -> None:
    from fedtreelora.core.tau_auto import rotate_within

    rng = np.random.default_rng(0)
    points, parent = rng.normal(size=(9, 4)), np.array([0, 0, 0, 0, 1, 1, 1, 1, 2])
    rotated = rotate_within(points, parent, 50, np.random.default_rng(1))
    for cluster in range(3):
        members = parent == cluster
        centred = points[members] - points[members].mean(axis=0)
        for draw in rotated:
            assert np.allclose(draw[members].mean(axis=0), points[members].mean(axis=0))
            moved = draw[members] - draw[members].mean(axis=0)
            assert np.allclose(np.linalg.svd(moved, compute_uv=False), np.linalg.svd(centred, compute_uv=False))
    assert not np.allclose(rotated[0, :4], points[:4]), "clients of a cluster are mixed"
    assert np.allclose(rotated[:, 8], points[8]), "a singleton cluster stays where it is"


def test_client_configuration_divides_out_each_clients_scale() -> None:
    """Scaling client i's squared distances by t_i (d2[i, j] * t_i * t_j) changes the embedding's distances
    by one common factor only (to which silhouettes are blind): that scale is the client's, not a group's."""
    from fedtreelora.core.tau_auto import client_configuration

    d = ftl.layer_distances(noise_b(0, 8, 3))
    t = np.exp(np.random.default_rng(1).normal(size=8))
    scaled = d * np.sqrt(np.outer(t, t))[None]
    first, second = client_configuration(d), client_configuration(scaled)
    gaps = [np.linalg.norm(x[:, None] - x[None], axis=2) for x in (first, second)]
    off = ~np.eye(8, dtype=bool)
    ratio = gaps[1][off] / gaps[0][off]
    assert np.allclose(ratio, ratio[0])
    assert not np.allclose(gaps[0], gaps[0][0, 1]), "the clients are not all equally far apart"


@pytest.mark.parametrize("tau", ["auto", 0.0])
def test_the_cluster_cap_bounds_the_search_in_tree_mode(tau: object) -> None:
    """With ``external="per_cluster"`` no layer may exceed ``max_clusters``: the search must score (and
    under auto test) only counts up to it, so a kept cut is one the search chose, not a re-cut."""
    four = np.arange(12) % 4
    d = ftl.layer_distances(planted_b(0, four, range(3, 6)))
    plan = strategy(tau=tau, window=4, external="per_cluster", max_clusters=2).plan_from_distances(d)
    previous = 1
    for layer in range(6):
        assert max(plan.scores[layer]) <= 2
        if tau == "auto":
            assert sorted(plan.test_scores[layer]) == ([2] if previous == 1 else [])
        c = int(plan.cuts[layer])
        if tau == "auto":
            assert c == previous or c in plan.admissible[layer], "a finer cut only when admitted"
        previous = c
    assert plan.cuts.max() <= 2


def test_each_layer_is_tested_within_the_previous_layers_partition(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cuts that need not nest (``cut_mode="independent"``) can keep the same count with a different
    partition from one layer to the next; the relabelling stage must then be rerun within the new
    partition, not reused from the old one with the same count."""
    from fedtreelora.core.plan import search_cuts

    groups = np.arange(12) % 2
    d = ftl.layer_distances(planted_b(0, groups, range(3, 6)))
    tree = build_tree(d.mean(axis=0))
    halves = (np.arange(12) >= 6).astype(np.int64)  # layer 4's two clusters: not layer 3's

    def partition(layer: int, c: int) -> np.ndarray:
        return halves if (layer, c) == (4, 2) else cut_exact(tree, 12, c)

    calls: list[tuple[np.ndarray, int]] = []
    original = RelabellingTest.stage

    def spy(self: RelabellingTest, parent: np.ndarray, start: int, counts: list[int]) -> object:
        calls.append((np.asarray(parent).copy(), start))
        return original(self, parent, start, counts)

    monkeypatch.setattr(RelabellingTest, "stage", spy)
    plan = search_cuts(d, tree, partition, tau="auto", window=2, test=RelabellingTest(d))
    assert plan.cuts.tolist() == [1, 1, 1, 2, 2, 2] and not np.array_equal(plan.labels[3], plan.labels[4])
    for layer in range(1, 6):
        parent, _ = [call for call in calls if call[1] <= layer][-1]  # the stage that tested this layer
        assert np.array_equal(parent, plan.labels[layer - 1]), f"layer {layer} tested in a stale partition"


# --- (g) real adapters: two domains, eight clients ---------------------------------------------------------------
def load_fixture(name: str) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(Path(__file__).parent / "data" / name)
    return data["distances"], data["groups_depth1"]


def test_real_adapters_in_two_domains_pass_the_relabelling_stage_at_every_layer() -> None:
    """Eight real clients, four per domain (tests/data): the tree built without any one layer cuts exactly
    the two domains, and that cut beats its relabelling null at every layer; the relabelling stage on its
    own would admit the planted split everywhere."""
    d, groups = load_fixture("fixture_domains_lr1e-3.npz")
    test = RelabellingTest(d)
    stage = test.stage(np.zeros(d.shape[1], dtype=np.int64), 0, [2])
    for layer in range(d.shape[0]):
        assert ari_by_layer(test.held_out_cut(layer, 2)[None], [groups.tolist()])[0, 0] == 1.0
        assert stage.statistics[layer][2] > stage.quantiles[layer][2]


@pytest.mark.parametrize("window", [2, 3])
def test_real_adapters_in_two_domains_are_split_along_the_domains(window: int) -> None:
    """The same eight clients: auto admits the two domains, in every layer (each layer's relabelling test
    passes, and the clients' pooled structure is grouped once scales are divided out of every rotation)."""
    d, groups = load_fixture("fixture_domains_lr1e-3.npz")
    plan = ftl.plan_sharing(d, "auto", window)
    ari = ari_by_layer(plan.labels, [groups.tolist()])[:, 0]
    assert plan.cuts.tolist() == [2] * 6 and np.all(ari == 1.0)


def test_two_groups_spread_as_much_as_the_noise_are_found() -> None:
    """Two planted groups of six whose means differ, in layers 3-5 of six, by as much as the noise (sep 0.5
    per entry against noise 1 in the other direction's units): the grouping gate must see them (it missed
    all of them when the rotations kept scale differences that the observed configuration had lost)."""
    two = np.arange(12) * 2 // 12
    found = 0
    for seed in range(10):
        plan = ftl.plan_sharing(ftl.layer_distances(planted_b(seed, two, range(3, 6), sep=0.5)), "auto", 3)
        ari = ari_by_layer(plan.labels, [two.tolist()])[:, 0]
        found += int(plan.cuts[-1] == 2 and ari[-1] == 1.0)
    assert found >= 8


def test_six_real_clients_in_two_groups_of_three_are_split_along_the_groups() -> None:
    """Six real clients, tweets with plain and swapped labels (tests/data): only 10 distinct 3 + 3
    relabellings exist, so the layers are tested by rotation, and with window 2 every layer splits exactly
    along the planted groups. (With window 3 the grouping gate's max over 2 and 3 clusters is not beaten:
    the clients stay shared.)"""
    d, groups = load_fixture("fixture_tweets_swap6.npz")
    tree = build_tree(d.mean(axis=0))
    assert ari_by_layer(cut_exact(tree, 6, 2)[None], [groups.tolist()])[0, 0] == 1.0
    plan = ftl.plan_sharing(d, "auto", 2)
    assert plan.cuts.tolist() == [2] * 6
    assert np.all(ari_by_layer(plan.labels, [groups.tolist()])[:, 0] == 1.0)
