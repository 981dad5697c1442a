"""How rounds are scored (``federation.evaluate``) and the equivalence of one cluster everywhere with FedIT."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from fedtreelora.config import load_config
from fedtreelora.engines import SimulationEngine

pytestmark = pytest.mark.slow

SMALL = [
    "model.num_layers=2",
    "model.max_length=32",
    "model.dropout=0.1",
    "data.num_clients=4",
    "data.n_train=16",
    "data.n_val=16",
    "train.local_epochs=1",
    "train.batch_size=8",
    "federation.rounds=4",
    "logging.tensorboard=false",
]


Rows = dict[tuple[int, int], dict[str, Any]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., tuple[dict[str, Any], Rows, Path]]:
    """Run a small experiment once per set of overrides (tests share runs): (summary, rows by
    (round, client), run folder)."""
    cache: dict[tuple[str, ...], tuple[dict[str, Any], Rows, Path]] = {}

    def run(*overrides: str) -> tuple[dict[str, Any], Rows, Path]:
        if overrides not in cache:
            out = tmp_path_factory.mktemp("run")
            config = load_config(overrides=[*SMALL, *overrides])
            summary = SimulationEngine(config, out, quiet=True, report=False).run()
            lines = (out / "metrics.jsonl").read_text().splitlines()
            cache[overrides] = summary, {(r["round"], r["client"]): r for r in map(json.loads, lines) if r}, out
        return cache[overrides]

    return run


SCORES = ("train_loss", "accuracy", "eval_loss", "received_accuracy", "received_eval_loss")
FEDIT = ("method=fedit", "fedit.warmup_rounds=2")


def test_one_cluster_everywhere_is_fedit_after_the_same_warmup(runs) -> None:  # type: ignore[no-untyped-def]
    """FedTreeLoRA with window 1 (every layer one cluster: the cluster expert alone, lambda fixed at 1)
    computes what FedIT computes after the same local warm-up, bit for bit."""
    tree, tree_rows, tree_dir = runs("method=fedtreelora", "fedtreelora.window=1", "fedtreelora.warmup_rounds=2")
    fedit, fedit_rows, fedit_dir = runs(*FEDIT)
    assert tree["cuts"] == [1, 1]
    assert [h["phase"] for h in tree["history"]] == [h["phase"] for h in fedit["history"]]
    assert tree_rows.keys() == fedit_rows.keys()
    for key, row in tree_rows.items():
        assert {f: row[f] for f in SCORES} == {f: fedit_rows[key][f] for f in SCORES}, key
    assert tree["trainable_params_per_client"] == fedit["trainable_params_per_client"], "no lambda trains"
    for k in range(4):
        mine = load_file(tree_dir / "clients" / f"client_{k:03d}.safetensors")
        theirs = load_file(fedit_dir / "clients" / f"client_{k:03d}.safetensors")
        for key, value in theirs.items():
            if ".shared." in key:
                assert mine[key.replace(".shared.", ".cluster.")].equal(value), (k, key)


def test_fixed_single_cluster_is_fedit_and_receives_only_after_warmup(runs) -> None:  # type: ignore[no-untyped-def]
    _, tree_rows, _ = runs(
        "method=fedtreelora",
        "fedtreelora.cut_mode=fixed",
        "fedtreelora.fixed_clusters=1",
        "fedtreelora.warmup_rounds=2",
    )
    _, fedit_rows, _ = runs(*FEDIT)
    for key, row in tree_rows.items():
        assert {f: row[f] for f in SCORES} == {f: fedit_rows[key][f] for f in SCORES}, key
    # Before the last warm-up round nothing is received: both conventions score the same model. After
    # it the clients receive the average.
    for k in range(4):
        row = tree_rows[(0, k)]
        assert row["received_accuracy"] == row["accuracy"] and row["received_eval_loss"] == row["eval_loss"]
    assert all(tree_rows[(1, k)]["received_eval_loss"] != tree_rows[(1, k)]["eval_loss"] for k in range(4))


def test_local_scores_the_same_either_way(runs) -> None:  # type: ignore[no-untyped-def]
    local, rows, _ = runs("method=local")
    for row in rows.values():
        assert row["received_accuracy"] == row["accuracy"] and row["received_eval_loss"] == row["eval_loss"]
    assert local["by_convention"]["received"] == local["by_convention"]["trained"]


def test_the_setting_picks_the_headline(runs) -> None:  # type: ignore[no-untyped-def]
    received, rows, _ = runs(*FEDIT)
    trained, _, _ = runs(*FEDIT, "federation.evaluate=trained")
    assert received["evaluate"] == "received" and trained["evaluate"] == "trained"
    assert received["by_convention"] == trained["by_convention"], "both record both"
    for summary, name in ((received, "received"), (trained, "trained")):
        assert summary["final_mean"] == summary["by_convention"][name]["final_mean"]
        assert summary["best_mean"] == summary["by_convention"][name]["best_mean"]
    last = [rows[(3, k)]["received_accuracy"] for k in range(4)]
    assert received["per_client"] == pytest.approx(last)
    assert received["history"][3]["received_mean_metric"] == pytest.approx(sum(last) / 4)


class ZeroFederatedUploads(SimulationEngine):
    """Every upload of a federated round arrives as zeros: what the clients receive from then on carries
    nothing they learned, so the rounds after warm-up score below the warm-up rounds."""

    def tamper(self, rnd: int, client: int, upload: dict[str, Any]) -> dict[str, Any]:
        return {k: v.new_zeros(v.shape) for k, v in upload.items()} if rnd >= 2 else upload


def test_a_best_round_in_warmup_and_the_best_federated_round_after_it(tmp_path: Path) -> None:
    """The best round (as the papers report it) is a warm-up round here; the best federated round is the
    best of the rounds after warm-up, under both conventions, and each client's score at it is recorded."""
    overrides = [*SMALL, *FEDIT, "data.n_train=32", "model.num_layers=1", "train.local_epochs=2"]
    config = load_config(overrides=overrides)
    summary = ZeroFederatedUploads(config, tmp_path, quiet=True, report=True).run()
    history = summary["history"]
    assert [h["phase"] for h in history] == ["warmup", "warmup", "federated", "federated"]
    assert history[summary["best_round"]]["phase"] == "warmup", "what this test is about"
    means = [h["mean_metric"] for h in history]
    federated = max((2, 3), key=lambda r: (means[r], -r))
    assert summary["best_federated_round"] == federated
    assert summary["best_federated_mean"] == means[federated] < summary["best_mean"]
    for name in ("received", "trained"):
        values = [h[f"{name}_mean_metric"] for h in history]
        headline = summary["by_convention"][name]
        assert headline["best_federated_round"] == max((2, 3), key=lambda r: (values[r], -r)), name
        assert headline["best_federated_mean"] == max(values[2:]), name
    assert summary["by_convention"]["received"]["best_federated_mean"] == summary["best_federated_mean"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    at = {r["client"]: r["received_accuracy"] for r in rows if r["round"] == federated}
    assert summary["per_client_best_federated_round"] == [at[k] for k in range(4)]
    report = (tmp_path / "report.md").read_text()
    assert f"| best federated mean accuracy | {means[federated]:.4f} (round {federated + 1};" in report
