"""Flower's run config read back as a run's settings: one flat key per setting, strict booleans, the
same validation as `fedtreelora run`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import tomli_w
from flower_helpers import small_experiment
from flwr.common.config import get_fused_config_from_dir, parse_config_args

from fedtreelora.config import ConfigError, load_config
from fedtreelora.engines.flower.project import write_app
from fedtreelora.engines.flower.settings import FlowerRunSettings, experiment_to_run_config

GROUPS = [
    {"name": "sarcasm/plain", "clients": 2},
    {"name": "sarcasm/swapped", "clients": 2, "label_map": {"0": "1", "1": "0"}, "n_train": 8},
]


def _run_config(**changes: Any) -> dict[str, Any]:
    config = FlowerRunSettings.for_experiment(small_experiment("fedit")).to_run_config()
    config.update(changes)
    return config


def _fields_that_differ(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return sorted(key for key in a.keys() | b.keys() if a.get(key) != b.get(key))


def test_round_trip_keeps_every_setting():
    settings = FlowerRunSettings.for_experiment(small_experiment("fedit"), round_timeout=5.0, collect_states=False)
    back = FlowerRunSettings.from_run_config(settings.to_run_config())
    assert back.collect_states is False
    assert back.round_timeout == 5.0
    assert back.experiment == settings.experiment


@pytest.mark.parametrize(
    "config",
    [
        load_config(),
        load_config(method="fedit", overrides=["data.num_clients=4", "model.target_modules=[query, key, value]"]),
        load_config(
            overrides=[f"data.groups={GROUPS!r}".replace("'", '"'), "data.num_clients=4", "train.local_steps=3"]
            + ["federation.max_update_norm=5.0", "data.text_pair_column=null", "seed=7"]
        ),
        load_config(overrides=["data.num_clients=4", "federation.join={3: 4}", "federation.leave={1: 6}"]),
    ],
    ids=["default", "lists", "groups", "join-leave"],
)
def test_flat_run_config_round_trip_is_identity(config):
    flat = experiment_to_run_config(config)
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())  # what Flower's run config holds
    assert flat["rounds"] == config.federation.rounds and "federation.rounds" not in flat
    back = FlowerRunSettings.from_run_config(flat).experiment
    assert back == config
    assert back.model_dump(mode="json") == config.model_dump(mode="json")


def test_lists_and_none_travel_as_json_text():
    config = load_config(overrides=[f"data.groups={GROUPS!r}".replace("'", '"'), "data.num_clients=4"])
    flat = experiment_to_run_config(config)
    assert flat["model.target_modules"] == '["query", "value"]'
    assert flat["model.num_layers"] == "null"
    assert flat["data.groups"].startswith('[{"name": "sarcasm/plain", "clients": 2')
    # text that looks like JSON stays text for a setting that takes only text
    flat["data.text_column"] = "[1]"
    assert FlowerRunSettings.from_run_config(flat).experiment.data.text_column == "[1]"


def test_one_flat_key_overrides_exactly_that_setting():
    base = small_experiment("fedtreelora")
    flat = experiment_to_run_config(base)
    flat["train.lr"] = 1e-3
    changed = FlowerRunSettings.from_run_config(flat).experiment
    assert changed.train.lr == 1e-3
    differ = _fields_that_differ(experiment_to_run_config(changed), experiment_to_run_config(base))
    assert differ == ["train.lr"]
    flat = experiment_to_run_config(base)
    flat["rounds"] = 5
    assert _fields_that_differ(
        experiment_to_run_config(FlowerRunSettings.from_run_config(flat).experiment), experiment_to_run_config(base)
    ) == ["rounds"]


def test_flwr_run_config_overrides_the_written_app(tmp_path: Path):
    """What `flwr run APP --run-config "..."` hands the apps: Flower's own parsing and fusing of the
    app's pyproject.toml with the overrides."""
    base = small_experiment("fedtreelora")
    app = write_app(FlowerRunSettings.for_experiment(base, round_timeout=30.0), tmp_path / "app")
    overrides = parse_config_args(['train.lr=1e-3 fedtreelora.tau=0.2 model.target_modules=\'["query", "key"]\''])
    settings = FlowerRunSettings.from_run_config(get_fused_config_from_dir(app, overrides))
    assert settings.round_timeout == 30.0
    got = settings.experiment
    assert (got.train.lr, got.fedtreelora.tau, got.model.target_modules) == (1e-3, 0.2, ["query", "key"])
    differ = _fields_that_differ(experiment_to_run_config(got), experiment_to_run_config(base))
    assert differ == ["fedtreelora.tau", "model.target_modules", "train.lr"]
    # Flower itself refuses an override of a key the app does not have (the app writes every setting)
    with pytest.raises(ValueError, match="'train.lrr' is not present"):
        get_fused_config_from_dir(app, parse_config_args(["train.lrr=1e-3"]))
    # with no overrides the app's keys give back the experiment exactly
    assert FlowerRunSettings.from_run_config(get_fused_config_from_dir(app, {})).experiment == base
    # a TOML file of overrides works the same
    (tmp_path / "overrides.toml").write_text(tomli_w.dumps({"rounds": 2, "train": {"lr": 0.01}}))
    overrides = parse_config_args([str(tmp_path / "overrides.toml")])
    got = FlowerRunSettings.from_run_config(get_fused_config_from_dir(app, overrides)).experiment
    assert (got.federation.rounds, got.train.lr) == (2, 0.01)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, True), (False, False), ("true", True), ("FALSE", False), ("false", False), ("Yes", True)]
    + [("no", False), ("1", True), ("0", False), (1, True), (0, False)],
)
def test_collect_states_is_parsed_strictly(value, expected):
    settings = FlowerRunSettings.from_run_config(_run_config(**{"collect-states": value}))
    assert settings.collect_states is expected


def test_collect_states_defaults_to_true():
    config = _run_config()
    del config["collect-states"]
    assert FlowerRunSettings.from_run_config(config).collect_states is True


@pytest.mark.parametrize("value", ["maybe", "", 2, "off"])
def test_collect_states_rejects_anything_else(value):
    with pytest.raises(ValueError, match=r"'collect-states' must be a boolean \(true/false, 1/0 or yes/no\)"):
        FlowerRunSettings.from_run_config(_run_config(**{"collect-states": value}))


def test_invalid_experiment_reads_as_on_fedtreelora_run():
    with pytest.raises(ConfigError) as from_run:
        load_config(overrides=["data.num_clients=0"])
    with pytest.raises(ConfigError) as from_flower:
        FlowerRunSettings.from_run_config(_run_config(**{"data.num_clients": 0}))
    assert str(from_flower.value) == str(from_run.value)


def test_unknown_key_and_cross_field_checks_are_named():
    with pytest.raises(ConfigError, match=r"data.nclients: unknown key; valid keys here are"):
        FlowerRunSettings.from_run_config(_run_config(**{"data.nclients": 3}))
    with pytest.raises(ConfigError, match=r"tarin: unknown key"):
        FlowerRunSettings.from_run_config(_run_config(**{"tarin.lr": 0.1}))
    with pytest.raises(ConfigError, match="model.quantization applies to causal LMs"):
        FlowerRunSettings.from_run_config(_run_config(**{"model.quantization": "8bit"}))
    with pytest.raises(ConfigError, match=r"model.target_modules: Input should be a valid list"):
        FlowerRunSettings.from_run_config(_run_config(**{"model.target_modules": "query"}))


def test_keys_left_out_take_their_defaults():
    assert FlowerRunSettings.from_run_config({"method": "fedit"}).experiment == load_config(method="fedit")


def test_the_whole_experiment_as_one_json_key_is_refused():
    with pytest.raises(ConfigError, match="'experiment' key .* no longer read"):
        FlowerRunSettings.from_run_config(_run_config(experiment="{}"))
    with pytest.raises(ConfigError, match="both 'rounds' and 'federation.rounds'"):
        FlowerRunSettings.from_run_config(_run_config(**{"federation.rounds": 4}))
