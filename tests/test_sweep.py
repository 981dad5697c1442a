"""Suite variants: named rows of one method with their own options, so a sensitivity sweep is one
`compare` (nlu-sweep). Every row of one (dataset, seed) sees the same partition."""

from __future__ import annotations

import json

import pytest
import yaml

from fedtreelora.compare import plan_runs, run_compare
from fedtreelora.config import ConfigError
from fedtreelora.suites import Suite, load_suite

SMALL = {
    "version": 1,
    "name": "tiny-sweep",
    "methods": ["fedit", "fedtreelora", "tau-0.9"],
    "seeds": [1],
    "warmup_rounds": 1,
    "variants": {"tau-0.9": {"method": "fedtreelora", "overrides": {"fedtreelora": {"tau": 0.9}}}},
    "base": {
        "model": {"num_layers": 2, "rank": 4, "max_length": 32},
        "data": {"num_clients": 4, "n_train": 16, "n_val": 8},
        "train": {"local_epochs": 1, "batch_size": 8},
        "federation": {"rounds": 2},
        "logging": {"tensorboard": False},
    },
    "datasets": {"sarcasm": {"data": {"dataset": "sarcasm"}}},
}


def test_nlu_sweep_moves_one_knob_per_row_around_the_defaults() -> None:
    suite = load_suite("nlu-sweep")
    nlu = load_suite("nlu")
    specs = plan_runs(suite, "/nonexistent", seeds=[1], datasets=["sarcasm"])
    by_row = {s.method: s.config for s in specs}
    reference = nlu.resolve("fedtreelora", "sarcasm", 1)
    assert by_row["fedtreelora"].model_dump() == reference.model_dump(), "the default row is nlu's fedtreelora run"
    default = reference.method_options()
    for row, config in by_row.items():
        assert config.data == reference.data and config.seed == 1  # same partition for every row
        if row.startswith(("tau-", "window-", "warmup-")):
            knob, value = row.split("-", 1)
            knob = {"warmup": "warmup_rounds"}.get(knob, knob)
            options = config.method_options()
            assert config.method == "fedtreelora"
            assert getattr(options, knob) == type(getattr(default, knob))(float(value))
            changed = {k for k in type(options).model_fields if getattr(options, k) != getattr(default, k)}
            assert changed == {knob}, row


def test_variant_errors_name_the_problem(tmp_path) -> None:
    bad = dict(SMALL, variants={"fedit": {"method": "fedtreelora"}})
    with pytest.raises(ConfigError, match="variant name 'fedit'"):
        Suite.from_dict(bad)
    bad = dict(SMALL, variants={"v": {"method": "fedtreelora", "overrides": {"data": {"n_train": 8}}}})
    with pytest.raises(ConfigError, match="same partition"):
        Suite.from_dict(bad)
    bad = dict(SMALL, variants={"v": {"method": "fedtree", "overrides": {}}}, methods=["v"])
    with pytest.raises(ConfigError, match="unknown method"):
        plan_runs(Suite.from_dict(bad), tmp_path)
    with pytest.raises(ConfigError, match="tau-0.9"):
        plan_runs(Suite.from_dict(SMALL), tmp_path, methods=["tau-0.8"])


@pytest.mark.slow
def test_a_sweep_runs_as_one_comparison(tmp_path) -> None:
    path = tmp_path / "tiny-sweep.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    result = run_compare(load_suite(path), tmp_path / "out", quiet=True)
    assert [r["method"] for r in result.rows] == ["fedit", "fedtreelora", "tau-0.9"]
    runs = tmp_path / "out" / "runs" / "sarcasm"
    summaries = {
        row: json.loads((runs / row / "seed1" / "summary.json").read_text()) for row in ("fedtreelora", "tau-0.9")
    }
    assert yaml.safe_load((runs / "tau-0.9" / "seed1" / "config.yaml").read_text())["fedtreelora"]["tau"] == 0.9
    assert summaries["tau-0.9"]["method"] == "fedtreelora"
    # tau 0.9 is above any silhouette here, so nothing splits; identical partitions across rows
    assert summaries["tau-0.9"]["cuts"] == [1, 1]
    partitions = {(runs / row / "seed1" / "partition.json").read_text() for row in ("fedit", "fedtreelora", "tau-0.9")}
    assert len(partitions) == 1
    assert "tau-0.9" in (tmp_path / "out" / "table.md").read_text()
