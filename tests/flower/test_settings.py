"""Flower's run config read back as a run's settings: strict booleans, the same validation as `fedtreelora run`."""

from __future__ import annotations

import json
from typing import Any

import pytest
from flower_helpers import small_experiment

from fedtreelora.config import ConfigError, load_config
from fedtreelora.engines.flower.settings import FlowerRunSettings


def _run_config(**changes: Any) -> dict[str, Any]:
    config = FlowerRunSettings.for_experiment(small_experiment("fedit")).to_run_config()
    config.update(changes)
    return config


def test_round_trip_keeps_every_setting():
    settings = FlowerRunSettings.for_experiment(small_experiment("fedit"), round_timeout=5.0, collect_states=False)
    back = FlowerRunSettings.from_run_config(settings.to_run_config())
    assert back.collect_states is False
    assert back.round_timeout == 5.0
    assert back.experiment == settings.experiment


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
    data = small_experiment("fedit").model_dump(mode="json")
    data["data"]["num_clients"] = 0
    with pytest.raises(ConfigError) as from_run:
        load_config(overrides=["data.num_clients=0"])
    with pytest.raises(ConfigError) as from_flower:
        FlowerRunSettings.from_run_config(_run_config(experiment=json.dumps(data)))
    assert str(from_flower.value) == str(from_run.value)


def test_unknown_key_and_cross_field_checks_are_named():
    data = small_experiment("fedit").model_dump(mode="json")
    data["data"]["nclients"] = 3
    with pytest.raises(ConfigError, match=r"data.nclients: unknown key; valid keys here are"):
        FlowerRunSettings.from_run_config(_run_config(experiment=json.dumps(data)))
    data = small_experiment("fedit").model_dump(mode="json")
    data["model"]["quantization"] = "8bit"
    with pytest.raises(ConfigError, match="model.quantization applies to causal LMs"):
        FlowerRunSettings.from_run_config(_run_config(experiment=json.dumps(data)))


def test_experiment_must_be_a_json_object():
    with pytest.raises(ConfigError, match="must be a JSON object"):
        FlowerRunSettings.from_run_config(_run_config(experiment="[1, 2]"))
