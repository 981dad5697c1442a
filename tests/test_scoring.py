"""How rounds are scored (``federation.evaluate``) and the equivalence of one cluster everywhere with FedIT."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from fedtreelora.config import load_config
from fedtreelora.engines import SimulationEngine

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


def _run(out: Path, *overrides: str) -> tuple[dict[str, Any], dict[tuple[int, int], dict[str, Any]]]:
    config = load_config(overrides=[*SMALL, *overrides])
    summary = SimulationEngine(config, out, quiet=True, report=False).run()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    return summary, {(r["round"], r["client"]): r for r in rows}


SCORES = ("train_loss", "accuracy", "eval_loss", "received_accuracy", "received_eval_loss")


def test_one_cluster_everywhere_is_fedit_after_the_same_warmup(tmp_path: Path) -> None:
    """FedTreeLoRA with window 1 (every layer one cluster: the cluster expert alone, lambda fixed at 1)
    computes what FedIT computes after the same local warm-up, bit for bit."""
    tree, tree_rows = _run(
        tmp_path / "tree", "method=fedtreelora", "fedtreelora.window=1", "fedtreelora.warmup_rounds=2"
    )
    fedit, fedit_rows = _run(tmp_path / "fedit", "method=fedit", "fedit.warmup_rounds=2")
    assert tree["cuts"] == [1, 1]
    assert [h["phase"] for h in tree["history"]] == [h["phase"] for h in fedit["history"]]
    assert tree_rows.keys() == fedit_rows.keys()
    for key, row in tree_rows.items():
        assert {f: row[f] for f in SCORES} == {f: fedit_rows[key][f] for f in SCORES}, key
    assert tree["trainable_params_per_client"] == fedit["trainable_params_per_client"], "no lambda trains"
    for k in range(4):
        mine = load_file(tmp_path / "tree" / "clients" / f"client_{k:03d}.safetensors")
        theirs = load_file(tmp_path / "fedit" / "clients" / f"client_{k:03d}.safetensors")
        for key, value in theirs.items():
            if ".shared." in key:
                assert mine[key.replace(".shared.", ".cluster.")].equal(value), (k, key)


def test_fixed_single_cluster_is_fedit_too(tmp_path: Path) -> None:
    tree, tree_rows = _run(
        tmp_path / "tree", "method=fedtreelora", "fedtreelora.cut_mode=fixed", "fedtreelora.fixed_clusters=1",
        "fedtreelora.warmup_rounds=1", "federation.rounds=2",
    )  # fmt: skip
    fedit, fedit_rows = _run(tmp_path / "fedit", "method=fedit", "fedit.warmup_rounds=1", "federation.rounds=2")
    for key, row in tree_rows.items():
        assert {f: row[f] for f in SCORES} == {f: fedit_rows[key][f] for f in SCORES}, key


def test_received_equals_trained_where_nothing_is_received(tmp_path: Path) -> None:
    """Warm-up rounds before the last and local training receive nothing: both conventions score the
    same model, so the same number; the round after which the tree is built does receive."""
    tree, rows = _run(tmp_path / "tree", "method=fedtreelora", "fedtreelora.warmup_rounds=3", "fedtreelora.tau=-1")
    for (rnd, _), row in rows.items():
        if rnd < 2:
            assert row["received_accuracy"] == row["accuracy"] and row["received_eval_loss"] == row["eval_loss"]
    assert any(rows[(2, k)]["received_eval_loss"] != rows[(2, k)]["eval_loss"] for k in range(4))
    local, local_rows = _run(tmp_path / "local", "method=local")
    for row in local_rows.values():
        assert row["received_accuracy"] == row["accuracy"] and row["received_eval_loss"] == row["eval_loss"]
    assert local["by_convention"]["received"] == local["by_convention"]["trained"]


def test_the_setting_picks_the_headline(tmp_path: Path) -> None:
    received, rows = _run(tmp_path / "received", "method=fedit", "federation.rounds=2")
    trained, _ = _run(tmp_path / "trained", "method=fedit", "federation.rounds=2", "federation.evaluate=trained")
    assert received["evaluate"] == "received" and trained["evaluate"] == "trained"
    assert received["by_convention"] == trained["by_convention"], "both record both"
    for summary, name in ((received, "received"), (trained, "trained")):
        assert summary["final_mean"] == summary["by_convention"][name]["final_mean"]
        assert summary["best_mean"] == summary["by_convention"][name]["best_mean"]
    last = [rows[(1, k)]["received_accuracy"] for k in range(4)]
    assert received["per_client"] == pytest.approx(last)
    assert received["history"][1]["received_mean_metric"] == pytest.approx(sum(last) / 4)
