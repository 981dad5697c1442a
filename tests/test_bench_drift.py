"""benchmarks/bench_drift.py's choice of the drift and its ARI of the plans, on config dicts and a fake
summary (no training)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fedtreelora.config import load_run_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_drift  # noqa: E402

TWEETS = {"negative": "a", "positive": "b", "neutral": None}
PLANTED = [
    {"name": "sarcasm", "dataset": "sarcasm", "clients": 3, "label_map": {"not_sarcastic": "a", "sarcastic": "b"}},
    {"name": "tweets/plain", "dataset": "tweets", "clients": 3, "label_map": TWEETS},
    {
        "name": "tweets/swapped",
        "dataset": "tweets",
        "clients": 3,
        "label_map": {**TWEETS, "negative": "b", "positive": "a"},
    },
]


def test_the_drifting_group_takes_its_mirrors_labels_and_name() -> None:
    drift = bench_drift.mirror_drift(PLANTED, "sarcasm", None, 7)
    assert (drift.index, drift.group, drift.name, drift.round) == (1, "tweets/plain", "tweets/swapped", 7)
    assert drift.label_map == {"negative": "b", "positive": "a"}, "neutral stays dropped"
    back = bench_drift.mirror_drift(PLANTED, "sarcasm", "tweets/swapped", 4)
    assert (back.name, back.label_map) == ("tweets/plain", {"negative": "a", "positive": "b"})
    with pytest.raises(SystemExit, match="group 'sarcasm' of data.groups has no mirror"):
        bench_drift.mirror_drift(PLANTED, "sarcasm", "sarcasm", 4)


def test_the_quickstarts_plain_group_swaps_onto_the_swapped_one() -> None:
    groups = load_run_config().model_dump(mode="json")["data"]["groups"]
    drift = bench_drift.mirror_drift(groups, "sarcasm", None, 4)
    assert (drift.group, drift.name, drift.label_map) == (
        "plain",
        "swapped",
        {"negative": "positive", "positive": "negative"},
    )


def test_the_plan_in_force_at_the_swap_is_the_last_one_made_before_it() -> None:
    levels = [["s", "s", "t", "t"]]
    summary = {
        "plans": [
            {"round": 0, "labels": [[0, 1, 1, 2], [0, 0, 0, 0]]},
            {"round": 3, "labels": [[0, 0, 1, 1], [0, 0, 1, 1]]},
            {"round": 4, "labels": [[0, 0, 1, 1], [0, 0, 1, 1]]},
        ]
    }
    before, last = bench_drift.plan_ari(summary, levels, 3)
    assert before[1] == 0.0 and last == [1.0, 1.0]
    assert bench_drift.plan_ari(summary, levels, 4)[0] == [1.0, 1.0]
    once = {"labels": [[0, 0, 1, 1]]}
    assert bench_drift.plan_ari(once, levels, 3) == ([1.0], [1.0])
