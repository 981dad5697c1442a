"""Partial participation over Flower: every node scores what it would receive after every round, sampled
or not, and the run records what the in-process engine records, client by client and round by round."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flower_helpers import in_process, metrics_by_client_round, small_experiment
from test_messages import LoopbackGrid, task_identity  # noqa: F401  (task_identity: an autouse fixture)

from fedtreelora.config import ExperimentConfig
from fedtreelora.engines.flower.server import FlowerEngine
from fedtreelora.engines.flower.settings import FlowerRunSettings
from fedtreelora.runfolder import trained_record

pytestmark = pytest.mark.slow


def assert_same_records(got: dict, expected: dict) -> None:
    """Every (round, client) record has the same fields and values (floats within 1e-6) as expected."""
    for key, row in expected.items():
        assert got[key].keys() == row.keys(), key
        for field, value in row.items():
            if isinstance(value, float):
                assert got[key][field] == pytest.approx(value, abs=1e-6), (key, field)
            else:
                assert got[key][field] == value, (key, field)


def run_both(config: ExperimentConfig, tmp_path: Path) -> tuple[dict, dict, LoopbackGrid, dict, dict]:
    """Run ``config`` in process and over Flower's message path (a loopback grid of 4 nodes); returns
    the in-process summary, the Flower summary, the grid, and both runs' records by (round, client)."""
    reference = in_process(config, tmp_path / "in-process")
    grid = LoopbackGrid(FlowerRunSettings.for_experiment(config), num_nodes=4)
    summary = FlowerEngine(config, grid, tmp_path / "run", quiet=True, report=False).run()
    expected, got = metrics_by_client_round(tmp_path / "in-process"), metrics_by_client_round(tmp_path / "run")
    return reference, summary, grid, expected, got


def test_every_node_is_scored_each_round_as_in_process(tmp_path: Path) -> None:
    config = small_experiment("fedtreelora", num_clients=4, federation={"rounds": 3, "fraction_train": 0.5})
    reference, summary, grid, expected, got = run_both(config, tmp_path)
    assert sorted(got) == sorted(expected) == [(r, k) for r in range(3) for k in range(4)]
    assert sum(not trained_record(row) for row in got.values()) == 3 * 2, "half the clients sit each round out"
    assert_same_records(got, expected)
    assert [m.metadata.message_type for m in grid.sent].count("evaluate") == 3 * 4, "every node, every round"
    assert [m.metadata.message_type for m in grid.sent].count("train") == 3 * 2
    assert summary["per_client"] == pytest.approx(reference["per_client"], abs=1e-6)
    assert [h["mean_metric"] for h in summary["history"]] == pytest.approx(
        [h["mean_metric"] for h in reference["history"]], abs=1e-6
    )


def test_a_late_and_a_leaving_node_get_the_in_process_metrics(tmp_path: Path) -> None:
    """Client 3 joins at round 3 (after the tree is built), warms up alone for a round and is placed;
    client 1 leaves from round 4: over Flower's message path every record equals the in-process one."""
    config = small_experiment(
        "fedtreelora",
        num_clients=4,
        federation={"rounds": 4, "join": {3: 3}, "leave": {1: 4}},
        fedtreelora={"warmup_rounds": 1, "join_warmup_rounds": 1, "tau": -1.0},
    )
    reference, summary, grid, expected, got = run_both(config, tmp_path)
    assert sorted(got) == sorted(expected)
    assert (2, 3) in got and (1, 3) not in got and (3, 1) not in got
    assert got[(2, 3)]["phase"] == "warmup" != got[(2, 0)]["phase"]
    assert_same_records(got, expected)
    assert summary["placements"] == reference["placements"] and summary["labels"] == reference["labels"]
    assert summary["per_client"] == pytest.approx(reference["per_client"], abs=1e-6)


class LateGrid(LoopbackGrid):
    """A loopback grid on which the nodes in ``late`` are not there at the start: they connect (appear in
    ``get_node_ids``) only from its second call on, as a SuperNode started in the middle of a run."""

    def __init__(self, settings: FlowerRunSettings, num_nodes: int, late: set[int]) -> None:
        super().__init__(settings, num_nodes)
        self.late = late
        self.calls = 0

    def get_node_ids(self):  # type: ignore[no-untyped-def]
        self.calls += 1
        return [n for n in self.contexts if self.calls > 1 or n not in self.late]


def test_a_node_that_connects_in_the_middle_of_the_run_is_taken_in_at_its_round(tmp_path: Path) -> None:
    """Client 3's node is not there at the start; the server waits for it before round 3 (its join
    round), and the run records what the in-process engine records."""
    config = small_experiment(
        "fedtreelora",
        num_clients=4,
        federation={"rounds": 4, "join": {3: 3}},
        fedtreelora={"warmup_rounds": 1, "join_warmup_rounds": 1, "tau": -1.0},
    )
    reference = in_process(config, tmp_path / "in-process")
    grid = LateGrid(FlowerRunSettings.for_experiment(config), num_nodes=4, late={1003})
    summary = FlowerEngine(config, grid, tmp_path / "run", quiet=True, report=False).run()
    assert grid.calls == 2, "once at the start, once before round 3"
    to_late = [m for m in grid.sent if m.metadata.dst_node_id == 1003]
    assert to_late[0].metadata.message_type == "query", "asked for its counts when it connects"
    assert {int(m.content["config"]["round"]) for m in to_late[1:] if "round" in m.content["config"]} >= {2, 3}
    expected, got = metrics_by_client_round(tmp_path / "in-process"), metrics_by_client_round(tmp_path / "run")
    assert sorted(got) == sorted(expected)
    for key, row in expected.items():
        for field, value in row.items():
            assert got[key][field] == pytest.approx(value, abs=1e-6), (key, field)
    assert summary["placements"] == reference["placements"]
    assert summary["label_counts"] == reference["label_counts"], "the late node's counts are recorded"
    partition = json.loads((tmp_path / "run" / "partition.json").read_text())
    assert partition["clients"][3]["node"] == 1003 and sum(partition["clients"][3]["train_label_counts"]) > 0


def test_a_drifting_group_over_flower_gets_the_in_process_metrics(tmp_path: Path) -> None:
    """The first group's labels swap at round 3 (``data.groups[0].drift``): each simulated node reads its
    relabelled share from that round on, so every record equals the in-process one (a node that kept its
    first labels would train and score differently from round 3)."""
    swap = {"not_sarcastic": "sarcastic", "sarcastic": "not_sarcastic"}
    groups = [
        {"name": "plain", "dataset": "sarcasm", "clients": 2, "drift": {"round": 3, "label_map": swap}},
        {"name": "flipped", "dataset": "sarcasm", "clients": 2, "label_map": swap},
    ]
    config = small_experiment(
        "fedtreelora",
        num_clients=4,
        data={"groups": groups, "n_train": 16, "n_val": 16},
        federation={"rounds": 4},
        fedtreelora={"warmup_rounds": 1, "replan_every": 1, "tau": -1.0},
    )
    reference, summary, grid, expected, got = run_both(config, tmp_path)
    assert sorted(got) == sorted(expected)
    assert_same_records(got, expected)
    assert summary["plans"] == reference["plans"]
    assert summary["planted_groups"] == ["plain"] * 2 + ["flipped"] * 2, "drift.name unset: the name stays"
