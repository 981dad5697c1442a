"""benchmarks/bench_drift.py's choice of the drift and its ARI of the plans, on config dicts and a fake
summary (no training)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fedtreelora.config import load_run_config
from fedtreelora.data import planted_groups

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


def test_a_part_of_the_group_drifts_as_its_own_entry_and_the_rest_stays() -> None:
    drift = bench_drift.mirror_drift(PLANTED, "sarcasm", None, 7)
    groups, part = bench_drift.split_drifting(PLANTED, drift, 1)
    assert [(g["name"], g["clients"], "drift" in g) for g in groups] == [
        ("sarcasm", 3, False),
        ("tweets/plain", 2, False),
        ("tweets/plain-drifting", 1, True),
        ("tweets/swapped", 3, False),
    ]
    assert groups[2]["label_map"] == TWEETS and groups[2]["drift"]["name"] == "tweets/swapped"
    assert (part.index, part.group, part.name) == (2, "tweets/plain-drifting", "tweets/swapped")
    assert PLANTED[1]["clients"] == 3 and "drift" not in PLANTED[1], "the input is left as it was"
    config = load_run_config(
        None, [f"data.groups={groups}".replace("None", "null"), "data.num_clients=9", "federation.rounds=12"]
    )
    assert planted_groups(config.data, 6) == ["sarcasm"] * 3 + ["tweets/plain"] * 2 + ["tweets/swapped"] * 4
    whole, same = bench_drift.split_drifting(PLANTED, drift, None)
    assert same == drift and [g["clients"] for g in whole] == [3, 3, 3] and "drift" in whole[1]
    with pytest.raises(SystemExit, match="--drifting 4 is outside 1..3"):
        bench_drift.split_drifting(PLANTED, drift, 4)


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


def test_a_finished_run_is_reused_only_for_its_own_config(tmp_path: Path) -> None:
    """The benchmarks' run folders are reused across calls; one made with another config must not be
    read as this one's (a smoke run left in --out used to be)."""
    import bench_joining

    from fedtreelora.config import dump_config

    config = load_run_config()
    (tmp_path / "summary.json").write_text('{"final_mean": 0.5}')
    (tmp_path / "config.yaml").write_text(dump_config(config))
    assert bench_joining.run_one(config, tmp_path) == {"final_mean": 0.5}
    with pytest.raises(SystemExit, match="holds a finished run of another config"):
        bench_joining.run_one(load_run_config(seed=1), tmp_path)
