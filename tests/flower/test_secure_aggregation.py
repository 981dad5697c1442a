"""Secure aggregation of cluster experts (``privacy.secure_aggregation``): the settings it refuses, the
slot vectors whose one sum gives every cluster's mean, and SecAgg+ in Flower's simulation engine giving
the plain aggregation of the same uploads within one quantisation step."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flower_helpers import metrics_by_client_round, small_experiment
from safetensors.torch import load_file

from fedtreelora.config import load_config
from fedtreelora.core import group_means
from fedtreelora.engines import SimulationEngine
from fedtreelora.engines.flower.slots import Slots, clipping_range, cluster_means, masked_bytes, slot_vector
from fedtreelora.errors import ConfigError

SECURE = "privacy.secure_aggregation=true"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method=fedalt"], r"does not support method 'fedalt' \(its server builds each client's rest-of-world"),
        (["method=fedlease"], r"does not support method 'fedlease'.*use one of \['fedit', 'fedtreelora'\]"),
        (["method=feddpa"], r"'feddpa' \(not implemented for it\); set privacy.secure_aggregation=false or use one of"),
        (["federation.max_update_norm=2"], r"federation.max_update_norm=2 checks each client's upload.*unset"),
        (["federation.join={3: 2}"], r"federation.join places late clients .* remove federation.join"),
        (["fedtreelora.replan_every=2"], r"fedtreelora.replan_every rebuilds the tree .* unset"),
        (["data.num_clients=4", "federation.fraction_train=0.2"], r"only 1 of data.num_clients=4 is sampled"),
        (["privacy.secure_quantization_range=1001"], r"secure_quantization_range=1001 must be even"),
        (["data.num_clients=2000"], r"times data.num_clients=2000, below 2\*\*32.*e.g. 2097152"),
        (["privacy.secure_reconstruction_threshold=0"], r"privacy.secure_reconstruction_threshold"),
        (["privacy.secure_clipping_range=-1"], r"privacy.secure_clipping_range"),
    ],
)
def test_settings_that_need_individual_uploads_are_refused_with_the_fix(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[SECURE, *overrides])


def test_secure_aggregation_is_off_by_default_and_needs_flower() -> None:
    assert load_config().privacy.secure_aggregation is False
    config = load_config(overrides=[SECURE, "method=fedit"])
    with pytest.raises(ConfigError, match=r"needs the Flower engine .* set privacy.secure_aggregation=false"):
        SimulationEngine(config, None, quiet=True)


def _slots(slot: list[int], clusters: list[int], weight: float = 1.0) -> Slots:
    return Slots(keys=("l0", "l1"), slot=tuple(slot), clusters=tuple(clusters), weight=weight, clipping_range=2.0)


def test_one_sum_of_slot_vectors_gives_every_clusters_weighted_mean() -> None:
    """Five clients, layer 0 in one cluster, layer 1 in three: the slots' sum, divided by the counts,
    is each client's cluster mean, and averaging those gives the plain external expert too."""
    rng = np.random.default_rng(0)
    shapes = {"l0": (2, 3), "l1": (3, 2)}
    labels = np.array([[0, 0, 0, 0, 0], [2, 0, 1, 0, 2]])
    examples = np.array([3.0, 1.0, 4.0, 1.0, 5.0])
    uploads = {k: {key: torch.from_numpy(rng.normal(size=s)).float() for key, s in shapes.items()} for k in range(5)}
    slots = {k: _slots([0, int(labels[1, k])], [1, 3], examples[k] / examples.max()) for k in range(5)}
    vectors = [slot_vector(uploads[k], slots[k]) for k in range(5)]
    assert all(clipped == 0 for _, clipped in vectors)
    total = [sum(v[0][i] for v in vectors) for i in range(3)]
    means = cluster_means(total, slots, shapes, levels=2**22)
    for layer, key in enumerate(("l0", "l1")):
        values = np.stack([uploads[k][key].double().numpy() for k in range(5)])
        inside, outside = group_means(values, labels[layer], examples)
        pseudo = np.stack([means[k][key].double().numpy() for k in range(5)])
        np.testing.assert_allclose(pseudo, inside, rtol=0, atol=1e-6)
        # The external expert from the cluster means equals the plain one: total minus cluster.
        np.testing.assert_allclose(group_means(pseudo, labels[layer], examples)[1], outside, rtol=0, atol=1e-6)
    # A vector holds each tensor once per cluster of its layer, plus the counts, in int64.
    assert masked_bytes(slots[0], shapes) == 8 * (1 + 1 * 7 + 3 * 7)


def test_counts_that_disagree_with_the_contributors_are_an_error() -> None:
    shapes = {"l0": (1,), "l1": (1,)}
    slots = {k: _slots([0, k], [1, 2]) for k in range(2)}
    total = [
        sum(a)
        for a in zip(
            *(slot_vector({"l0": torch.ones(1), "l1": torch.ones(1)}, s)[0] for s in slots.values()), strict=True
        )
    ]
    with pytest.raises(RuntimeError, match=r"the nodes and the server disagree on the slots"):
        cluster_means(total, {0: slots[0]}, shapes, levels=2**22)


def test_values_outside_the_clipping_range_are_counted() -> None:
    _, clipped = slot_vector({"l0": torch.tensor([0.5, -3.0]), "l1": torch.tensor([2.5])}, _slots([0, 0], [1, 1]))
    assert clipped == 2


def test_the_clipping_range_follows_the_factors_scale_unless_set() -> None:
    privacy = load_config(overrides=[SECURE]).privacy
    payloads = [{"a": torch.tensor([0.3, -0.5])}, {"b": torch.tensor([0.1])}]
    # m = 0.5 (the largest factor sent), AdamW moves a value by about lr per step, 6 noise stds under DP
    assert clipping_range(privacy, payloads, 0.05, lr=0.01, steps=4) == pytest.approx(2 * (0.5 + 0.04))
    assert clipping_range(privacy, payloads, 0.05, lr=0.01, steps=4, noise_std=0.1) == pytest.approx(2 * 1.14)
    # before anything is sent (round 1 of FedIT) the initial A's bound is the scale
    assert clipping_range(privacy, [{}], 0.05, lr=0.01, steps=4) == pytest.approx(2 * (0.05 + 0.04))
    fixed = load_config(overrides=[SECURE, "privacy.secure_clipping_range=3"]).privacy
    assert clipping_range(fixed, payloads, 0.05, lr=0.01, steps=4, noise_std=0.1) == 3.0


# --- SecAgg+ in Flower's simulation engine ----------------------------------------------------------------------
def _state(run: Path, client: int, model: str) -> dict[str, torch.Tensor]:
    folder = run / "clients" / ("received" if model == "received" else "")
    return load_file(folder / f"client_{client:03d}.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fedit", "fedtreelora"])
def test_secure_experts_equal_the_plain_aggregation_within_one_quantisation_step(tmp_path: Path, method: str) -> None:
    """Four nodes, three rounds (FedTreeLoRA: one warm-up round in the clear, then two secure ones). After
    the last round each node's trained cluster expert is its last upload; the experts the server sent
    back (the received model) must equal the plain averages of those uploads (cluster and external)
    within one quantisation step of the round's clipping range, and differ from them (they were quantised)."""
    from fedtreelora.engines.flower.launch import simulate

    n = 4
    # FedTreeLoRA: tau -1 lets every layer leave the root, so that there are external experts to check.
    extra = {"fedtreelora": {"warmup_rounds": 1, "tau": -1.0}} if method == "fedtreelora" else {}
    config = small_experiment(method, num_clients=n, privacy={"secure_aggregation": True}, **extra)
    summary = simulate(config, tmp_path, echo=False, timeout=420)
    assert summary["rounds"] == 3
    records = metrics_by_client_round(tmp_path)
    last = [records[(2, k)] for k in range(n)]
    assert all(r.get("secure_clipped", 0) == 0 for r in records.values())
    step = last[0]["secure_step"]
    assert step == pytest.approx(2 * last[0]["secure_clipping_range"] / 2**22)
    expert = "shared" if method == "fedit" else "cluster"
    labels = np.asarray(summary["labels"])  # (layers, clients)
    trained = [_state(tmp_path, k, "trained") for k in range(n)]
    received = [_state(tmp_path, k, "received") for k in range(n)]
    keys = sorted(k for k in trained[0] if f".{expert}.lora_" in k)
    assert keys
    layer_of = {
        site["name"]: site["layer"] for site in json.loads((tmp_path / "clients" / "meta.json").read_text())["sites"]
    }
    if method == "fedtreelora":
        assert any(len(set(row)) > 1 for row in labels)
    worst, differs = 0.0, False
    for key in keys:
        layer = layer_of[key.rsplit(".", 2)[0]]
        values = np.stack([trained[k][key].double().numpy() for k in range(n)])
        inside, outside = group_means(values, labels[layer])
        pairs = [(inside, key)]
        if method == "fedtreelora" and len(set(labels[layer])) > 1:
            pairs.append((outside, key.replace(".cluster.", ".external.")))
        for plain, got_key in pairs:
            got = np.stack([received[k][got_key].double().numpy() for k in range(n)])
            worst = max(worst, float(np.abs(got - plain).max()))
            differs |= bool((got != plain).any())
    # float32 on the wire and in the received state adds a rounding of ~1e-7 relative to the values.
    assert worst <= step + 1e-6, (worst, step)
    assert differs
    # The masked vectors, not the float32 uploads, are what the nodes sent.
    plain_bytes = 4 * sum(trained[0][k].numel() for k in keys)
    assert last[0]["uplink_bytes"] >= 2 * plain_bytes


@pytest.mark.slow
def test_differential_privacy_under_secure_aggregation_gives_the_plain_private_experts(tmp_path: Path) -> None:
    """DP and SecAgg+ together: each node clips and noises its upload (seeded by run seed, round and
    client), then the noisy upload leaves only masked in its slot. One FedIT round from the same
    initialisation: the experts the server sends back equal those of the same private run without
    secure aggregation (the mean of the same noisy uploads) within one quantisation step, and are not
    exactly equal; the privacy ledger is the same."""
    from fedtreelora.engines.flower.launch import simulate

    n = 4
    dp = {"clip_norm": 0.05, "noise_multiplier": 1.0, "delta": 1e-3}
    runs = {}
    for name, secure in (("plain", False), ("secure", True)):
        config = small_experiment("fedit", rounds=1, num_clients=n, privacy={**dp, "secure_aggregation": secure})
        runs[name] = simulate(config, tmp_path / name, echo=False, timeout=420)
    step = metrics_by_client_round(tmp_path / "secure")[(0, 0)]["secure_step"]
    assert runs["secure"]["privacy"]["epsilon"] == pytest.approx(runs["plain"]["privacy"]["epsilon"])
    assert runs["secure"]["privacy"]["noise_multiplier"] == runs["plain"]["privacy"]["noise_multiplier"] == 1.0
    worst, differs = 0.0, False
    for k in range(n):
        plain, secure = _state(tmp_path / "plain", k, "received"), _state(tmp_path / "secure", k, "received")
        keys = sorted(key for key in plain if ".shared.lora_" in key)
        assert keys and keys == sorted(key for key in secure if ".shared.lora_" in key)
        for key in keys:
            worst = max(worst, float((secure[key].double() - plain[key].double()).abs().max()))
            differs |= bool((secure[key] != plain[key]).any())
    assert worst <= step + 1e-6, (worst, step)
    assert differs
