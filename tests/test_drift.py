"""Planted groups whose labels change at a known round (``data.groups[i].drift``): the configuration's
checks, the relabelled data, and tiny real runs that equal the run without drift up to its round and
resume exactly after it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedtreelora.config import ExperimentConfig, load_config
from fedtreelora.data import planted_groups
from fedtreelora.engines import SimulationEngine
from fedtreelora.engines.setup import build_federation, load_partitioned_data
from fedtreelora.errors import ConfigError
from fedtreelora.report import load_run
from fedtreelora.report.render import federation_change_rows
from fedtreelora.runfolder import RunFolder

SWAP = {"not_sarcastic": "sarcastic", "sarcastic": "not_sarcastic"}
TINY = [
    "model.num_layers=1",
    "data.n_train=16",
    "data.n_val=8",
    "train.batch_size=8",
    "train.local_epochs=1",
    "federation.rounds=4",
    "fedtreelora.warmup_rounds=1",
    "fedtreelora.replan_every=1",
    "fedtreelora.tau=-1",
    "logging.tensorboard=false",
]


def groups(drift: dict[str, Any] | None = None, *, plain: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Two sarcasm groups of two clients, the second with swapped labels; ``drift`` on the first."""
    first: dict[str, Any] = {"name": "plain", "dataset": "sarcasm", "clients": 2, **(plain or {})}
    if drift is not None:
        first["drift"] = drift
    return [first, {"name": "flipped", "dataset": "sarcasm", "clients": 2, "label_map": SWAP}]


def config(drift: dict[str, Any] | None = None, *overrides: str, **kwargs: Any) -> ExperimentConfig:
    return load_config(overrides=[f"data.groups={json.dumps(groups(drift, **kwargs))}", *TINY, *overrides])


#: the first group takes the second's labels (and name) from round 3 (1-based)
DRIFT = {"round": 3, "label_map": SWAP, "name": "flipped"}


# --- configuration ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("drift", "message"),
    [
        ({"round": 1, "label_map": SWAP}, r"data.groups\[0\].drift.round=1 is outside rounds 2..4"),
        ({"round": 5, "label_map": SWAP}, r"data.groups\[0\].drift.round=5 is outside rounds 2..4"),
        ({"round": 3, "label_map": SWAP, "name": "a//b"}, r"data.groups\[0\].drift.name='a//b' has an empty"),
        (
            {"round": 3, "label_map": SWAP, "name": "flipped/x"},
            r"data.groups\[1\].name='flipped' is a group and also a prefix of data.groups\[0\].drift.name",
        ),
        ({"round": 3}, r"data.groups.0.drift.label_map: Field required"),
    ],
)
def test_bad_drift_settings_name_the_field(drift: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config(drift)


def test_a_drift_name_may_only_clash_while_both_names_exist() -> None:
    """``flipped`` becomes ``x`` at round 2, so ``plain`` may become ``flipped/y`` at round 3."""
    both = groups({"round": 3, "label_map": SWAP, "name": "flipped/y"})
    both[1]["drift"] = {"round": 2, "label_map": {}, "name": "x"}
    cfg = load_config(overrides=[f"data.groups={json.dumps(both)}", *TINY])
    assert planted_groups(cfg.data, 0) == ["plain", "plain", "flipped", "flipped"]
    assert planted_groups(cfg.data, 1) == ["plain", "plain", "x", "x"]
    assert planted_groups(cfg.data, 2) == ["flipped/y", "flipped/y", "x", "x"]
    both[1]["drift"]["round"] = 4
    with pytest.raises(ConfigError, match=r"data.groups\[1\].name='flipped' is a group and also a prefix"):
        load_config(overrides=[f"data.groups={json.dumps(both)}", *TINY])


@pytest.mark.parametrize(
    ("label_map", "message"),
    [
        ({"sarcastc": "a"}, r"data.groups\[0\].drift.label_map \(plain\) names \['sarcastc'\], which 'sarcasm' does"),
        ({"sarcastic": None}, r"maps 'sarcastic' to null, but the group's clients hold examples of it"),
        ({"sarcastic": "c"}, r"maps 'sarcastic' to 'c', which is not a label of the federation"),
    ],
)
def test_drift_maps_that_do_not_fit_the_source_name_the_field(label_map: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_partitioned_data(config({"round": 3, "label_map": label_map}))


def test_a_drift_cannot_bring_back_a_label_the_group_drops() -> None:
    drops = {"label_map": {"sarcastic": None}, "n_train": 4, "n_val": 2}
    with pytest.raises(ConfigError, match=r"but data.groups\[0\].label_map drops 'sarcastic'"):
        load_partitioned_data(
            config({"round": 3, "label_map": {"sarcastic": "sarcastic"}}, "model.head=local", plain=drops)
        )


def test_a_deployed_site_cannot_follow_a_drift(tmp_path: Path) -> None:
    from fedtreelora.engines.flower.node import node_client, node_info
    from fedtreelora.engines.flower.sites import write_sites

    cfg = config(DRIFT)
    for call in (
        lambda: node_info(cfg, {"client-id": 0, "data": str(tmp_path)}),
        lambda: node_client(cfg, {"client-id": 0, "data": str(tmp_path)}),
        lambda: write_sites(cfg, tmp_path),
    ):
        with pytest.raises(ConfigError, match=r"data.groups\[0\].drift is set, but a deployed site"):
            call()
    assert not list(tmp_path.iterdir()), "nothing written"


# --- data -------------------------------------------------------------------------------------------


def test_from_its_round_a_drifting_group_trains_and_is_scored_on_the_same_examples_relabelled(
    one_thread: None,
) -> None:
    dataset, clients = load_partitioned_data(config())
    drifted_dataset, drifted = load_partitioned_data(config(DRIFT))
    names = dataset.label_names
    swap = np.asarray([names.index(SWAP[n]) for n in names])
    for before, after in zip(clients, drifted, strict=True):
        np.testing.assert_array_equal(before.train_indices, after.train_indices)
        np.testing.assert_array_equal(before.val_indices, after.val_indices)
        assert before.drift is None
    np.testing.assert_array_equal(dataset.train.labels, drifted_dataset.train.labels)
    for c in drifted[:2]:
        assert c.drift is not None and c.drift.round == 2, "round 3, 1-based"
        np.testing.assert_array_equal(c.drift.train_labels, swap[dataset.train.labels[c.train_indices]])
        np.testing.assert_array_equal(c.drift.val_labels, swap[dataset.validation.labels[c.val_indices]])
        assert len(set(c.drift.train_labels.tolist())) == 2
    assert [c.drift for c in drifted[2:]] == [None, None], "the other group keeps its labels"

    fed = build_federation(config(DRIFT))
    for k in range(4):
        assert fed.client_data(1, k) == (fed.train_data[k], fed.val_data[k])
    for k in (0, 1):
        train, val = fed.client_data(2, k)
        assert train.input_ids is fed.train_data[k].input_ids and val.input_ids is fed.val_data[k].input_ids
        np.testing.assert_array_equal(train.labels, swap[fed.train_data[k].labels])
        np.testing.assert_array_equal(val.labels, swap[fed.val_data[k].labels])
        assert fed.client_data(3, k)[1] is val
    assert fed.client_data(3, 2) == (fed.train_data[2], fed.val_data[2])


# --- runs -------------------------------------------------------------------------------------------


class Interrupted(RuntimeError):
    pass


class StopsAt(SimulationEngine):
    """Crashes when it reaches round 3 (0-based), after the drift's round and its checkpoint."""

    def _round(self, fed: Any, runner: Any, rnd: int, run: Any, tick: Any) -> dict[str, Any]:
        if rnd == 3:
            raise Interrupted
        return super()._round(fed, runner, rnd, run, tick)


def rows(folder: Path) -> dict[tuple[int, int], dict[str, Any]]:
    return {(r["round"], r["client"]): r for r in RunFolder(folder).read_metrics()}


@pytest.mark.slow
def test_a_drifting_run_equals_the_run_without_drift_before_its_round_and_resumes_after_it(
    tmp_path: Path, one_thread: None
) -> None:
    SimulationEngine(config(), tmp_path / "plain", quiet=True, report=False).run()
    drifting = config(DRIFT)
    whole = SimulationEngine(drifting, tmp_path / "drift", quiet=True, report=False).run()
    plain, drift = rows(tmp_path / "plain"), rows(tmp_path / "drift")
    assert sorted(plain) == sorted(drift)
    for key, row in plain.items():
        if key[0] < 2:
            assert drift[key] == row, f"round {key[0] + 1}, client {key[1]}: bit for bit before the drift"
    assert all(drift[(2, k)]["train_loss"] != plain[(2, k)]["train_loss"] for k in (0, 1)), "new labels"
    assert whole["planted_groups"] == ["flipped"] * 4, "the groups after the drift"
    partition = json.loads((tmp_path / "drift" / "partition.json").read_text())
    assert [c["group"] for c in partition["clients"]] == ["plain", "plain", "flipped", "flipped"]
    assert partition["groups"][0]["drift"] == {"round": 3, "label_map": SWAP, "name": "flipped"}
    changes = federation_change_rows(load_run(tmp_path / "drift"))
    assert changes is not None
    assert [
        "3",
        "labels drifted",
        "0-1",
        "group plain -> flipped (not_sarcastic -> sarcastic, sarcastic -> not_sarcastic)",
    ] in changes[1]

    with pytest.raises(Interrupted):
        StopsAt(drifting, tmp_path / "cut", quiet=True, report=False).run()
    resumed = SimulationEngine(drifting, tmp_path / "cut", quiet=True, report=False, resume=True).run()
    assert RunFolder(tmp_path / "cut").read_metrics() == RunFolder(tmp_path / "drift").read_metrics()
    for key in ("per_client", "final_mean", "labels", "plans", "planted_groups", "ari"):
        assert resumed[key] == whole[key], key
