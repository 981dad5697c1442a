"""Federations that change, end to end on a tiny real run: clients that join late and leave early
(``federation.join`` / ``leave``) train, count and are scored only while they are there; a FedTreeLoRA
late client warms up alone and is placed; a run interrupted after a join and a leave resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedtreelora.config import load_config
from fedtreelora.engines import SimulationEngine
from fedtreelora.runfolder import RunFolder

#: four clients over four rounds: client 3 arrives at round 3, client 1 leaves from round 4 on (1-based)
TINY = [
    "model.num_layers=1",
    "data.num_clients=4",
    "data.n_train=16",
    "data.n_val=8",
    "train.batch_size=8",
    "train.local_epochs=1",
    "federation.rounds=4",
    "federation.join={3: 3}",
    "federation.leave={1: 4}",
    "fedtreelora.warmup_rounds=1",
    "fedtreelora.join_warmup_rounds=1",
    "fedlease.warmup_rounds=1",
    "logging.tensorboard=false",
]
PRESENT = [[0, 1, 2], [0, 1, 2], [0, 1, 2, 3], [0, 2, 3]]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fedtreelora", "fedit", "local", "fedlease", "fedalt"])
def test_absent_clients_neither_train_nor_count_nor_are_scored(tmp_path: Path, method: str, one_thread: None) -> None:
    summary = SimulationEngine(
        load_config(overrides=[*TINY, f"method={method}"]), tmp_path, quiet=True, report=False
    ).run()
    rows = RunFolder(tmp_path).read_metrics()
    for rnd, present in enumerate(PRESENT):
        h = summary["history"][rnd]
        assert h["clients"] == present and h["present"] == present
        mine = {r["client"]: r for r in rows if r["round"] == rnd}
        assert sorted(mine) == present, "only the clients in the federation are scored"
        assert h["received_mean_metric"] == pytest.approx(
            sum(r["received_accuracy"] for r in mine.values()) / len(mine)
        )
    assert summary["history"][2]["joined"] == [3] and summary["history"][3]["left"] == [1]
    assert [summary["history"][r]["clients"] for r in range(4)] == PRESENT
    per_client = summary["per_client"]
    assert per_client[3] is not None and per_client[1] is not None, "the last score each client had"
    if method == "fedtreelora":
        phases = {(r["round"], r["client"]): r["phase"] for r in rows}
        assert phases[(2, 3)] == "warmup" and phases[(2, 0)] != "warmup", "the late client warms up alone"
        assert phases[(3, 3)] == phases[(3, 0)], "and then goes on like the others"
        (placement,) = summary["placements"]
        assert placement["client"] == 3 and placement["round"] == 2 and placement["joined"] == 2
        assert min(summary["labels"][0][k] for k in range(4)) >= 0, "every client has its place in the tree"


class Interrupted(RuntimeError):
    pass


class StopsAt(SimulationEngine):
    """Crashes when it reaches round ``stop`` (0-based), after the previous round's checkpoint."""

    stop = 3

    def _round(self, fed: Any, runner: Any, rnd: int, run: Any, tick: Any) -> dict[str, Any]:
        if rnd == self.stop:
            raise Interrupted
        return super()._round(fed, runner, rnd, run, tick)


@pytest.mark.slow
def test_a_run_interrupted_after_a_join_and_a_leave_resumes_to_the_same_metrics(
    tmp_path: Path, one_thread: None
) -> None:
    overrides = [*TINY, "method=fedtreelora", "fedtreelora.tau=-1", "federation.leave={1: 3}"]
    config = load_config(overrides=[*overrides, "fedtreelora.replan_every=1"])
    reference = SimulationEngine(config, tmp_path / "whole", quiet=True, report=False).run()
    with pytest.raises(Interrupted):
        StopsAt(config, tmp_path / "cut", quiet=True, report=False).run()
    resumed = SimulationEngine(config, tmp_path / "cut", quiet=True, report=False, resume=True).run()
    assert RunFolder(tmp_path / "cut").read_metrics() == RunFolder(tmp_path / "whole").read_metrics()
    for key in ("per_client", "final_mean", "best_mean", "labels", "plan", "placements", "plans"):
        assert resumed[key] == reference[key], key


@pytest.mark.slow
def test_clients_in_different_phases_train_together_as_alone(tmp_path: Path, one_thread: None) -> None:
    """A late client's warm-up and the others' federated round run in separate passes of the vectorised
    runner: the same records as one client at a time, up to float rounding."""
    overrides = [*TINY, "method=fedtreelora", "fedtreelora.tau=-1", "train.device=cpu"]
    alone = SimulationEngine(load_config(overrides=[*overrides, "train.clients_per_pass=1"]), quiet=True).run()
    together = SimulationEngine(load_config(overrides=[*overrides, "train.clients_per_pass=4"]), quiet=True).run()
    assert together["placements"] == alone["placements"]
    assert [h["clients"] for h in together["history"]] == PRESENT
    for a, b in zip(alone["per_client"], together["per_client"], strict=True):
        assert b == pytest.approx(a, abs=1e-6)
    for a, b in zip(alone["history"], together["history"], strict=True):
        assert b["mean_train_loss"] == pytest.approx(a["mean_train_loss"], abs=1e-5)


@pytest.mark.slow
def test_the_report_shows_joins_placements_and_plans(tmp_path: Path, one_thread: None) -> None:
    """Client 3 arrives at round 3 and is placed after its two rounds of warm-up; client 2 arrives at
    round 5, too late to be placed (it has no cluster at the end); the tree is re-planned every round
    (over the placed clients: 0 and 1, then 0, 1 and 3)."""
    overrides = [
        *TINY,
        "method=fedtreelora",
        "federation.rounds=5",
        "federation.join={3: 3, 2: 5}",
        "federation.leave={}",
        "fedtreelora.join_warmup_rounds=2",
        "fedtreelora.replan_every=1",
        "fedtreelora.replan_from=uploads",  # each re-plan rebuilds the tree over the placed clients
        "fedtreelora.tau=-1",
    ]
    summary = SimulationEngine(load_config(overrides=overrides), tmp_path, quiet=True).run()
    assert [p["client"] for p in summary["placements"]] == [3]
    assert [p["round"] for p in summary["plans"]] == [0, 1, 2, 3, 4]
    assert [row[2] for row in summary["labels"]] == [-1], "client 2 was never placed"
    assert summary["tree_clients"] == [0, 1, 3], "the last plan's tree: the placed clients"
    from fedtreelora.report.data import load_run

    assert load_run(tmp_path).tree_clients == [0, 1, 3]
    meta = json.loads((tmp_path / "clients" / "meta.json").read_text())
    assert meta["received_phase_of_client"]["2"]["name"] == "warmup", "client 2 was scored in its own warm-up"
    assert "3" not in meta.get("received_phase_of_client", {})
    report = (tmp_path / "report.md").read_text()
    assert "## Federation changes" in report
    assert "| 4 | placed (after the round) | 3 |" in report and "| 5 | joined | 2 |" in report
    assert "re-planned (after the round)" in report


@pytest.mark.slow
def test_a_planted_federation_records_where_newcomers_went(tmp_path: Path, one_thread: None) -> None:
    """On planted groups, the summary scores the late clients' placements against their groups."""
    swap = {"not_sarcastic": "sarcastic", "sarcastic": "not_sarcastic"}
    groups = [{"name": "sarcasm/plain", "clients": 2}, {"name": "sarcasm/flipped", "clients": 3, "label_map": swap}]
    overrides = [
        f"data.groups={json.dumps(groups)}",
        *[o for o in TINY if not o.startswith(("data.num_clients", "federation.leave"))],
        "method=fedtreelora",
        "federation.join={4: 3}",
        "fedtreelora.tau=-1",
    ]
    summary = SimulationEngine(load_config(overrides=overrides), tmp_path, quiet=True, report=False).run()
    assert [p["client"] for p in summary["placements"]] == [4]
    agreement = summary["placement_agreement"]
    assert len(agreement) == 1 and len(agreement[0]) == 2, "(layers, depths)"
    assert agreement[0][0] == 1.0, "at depth 1 everyone is 'sarcasm': any cluster agrees"
    assert agreement[0][1] in (0.0, 1.0)
