"""End to end on real data and a real model: MiniLM (cut to 2 layers where only the plumbing is tested)
on sarcasm headlines and tweets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedtreelora.cli import main
from fedtreelora.compare.stats import majority_rate
from fedtreelora.config import QUICKSTART, load_config
from fedtreelora.engines import SimulationEngine

TINY = [
    "data.groups=null",  # the CLI starts from the quickstart experiment, whose clients are groups
    "model.num_layers=2",
    "data.num_clients=4",
    "data.n_train=48",
    "data.n_val=32",
    "train.batch_size=16",
    "federation.rounds=3",
    "fedtreelora.warmup_rounds=1",
]


@pytest.mark.slow
def test_federated_training_learns_beyond_each_clients_majority_class(tmp_path: Path) -> None:
    """Loss falls and personalized accuracy ends well above what each client's majority class scores.

    The quickstart's federation (tweets, plain and label-swapped groups, balanced labels) cut to 4
    clients: at lr 3e-3 the full 6-layer MiniLM learns the task in two warm-up rounds (seed 0: 0.755
    against a majority rate of 0.583). A 2-layer MiniLM with its frozen random head does not: its loss
    stays at chance and any accuracy above 0.5 comes from the clients' label skew alone."""
    config = load_config(
        QUICKSTART,
        overrides=[
            "data.groups=[{name: plain, dataset: tweets, clients: 2, label_map: {negative: negative, "
            "positive: positive, neutral: null}}, {name: swapped, dataset: tweets, clients: 2, "
            "label_map: {negative: positive, positive: negative, neutral: null}}]",
            "data.num_clients=4",
            "data.n_train=96",
            "data.n_val=48",
            "train.lr=3e-3",
            "federation.rounds=3",
            "fedtreelora.warmup_rounds=2",
        ],
    )
    summary = SimulationEngine(config, tmp_path, quiet=True, report=False).run()
    history = summary["history"]
    assert history[-1]["mean_train_loss"] < history[0]["mean_train_loss"] - 0.05
    majority = majority_rate(json.loads((tmp_path / "partition.json").read_text()))
    assert summary["best_mean"] > majority + 0.08, (summary["best_mean"], majority)
    assert summary["cuts"] is not None and len(summary["cuts"]) == 6


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fedtreelora", "fedit", "local"])
def test_cli_run_writes_config_metrics_and_summary(tmp_path: Path, method: str) -> None:
    out = tmp_path / "run"
    args = ["run", "--method", method, "--seed", "3", "--out", str(out), "--quiet"]
    for assignment in TINY:
        args += ["--set", assignment]
    if method == "fedtreelora":
        args += ["--set", "fedtreelora.tau=-1"]  # every layer splits: an external expert everywhere
    assert main(args) == 0
    config = (out / "config.yaml").read_text()
    assert f"method: {method}" in config and "seed: 3" in config
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 4
    assert {(r["round"], r["client"]) for r in rows} == {(r, c) for r in range(3) for c in range(4)}
    for key in ("round", "client", "phase", "train_loss", "accuracy", "num_train", "num_val"):
        assert all(key in r for r in rows), key
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["num_train"] == 48 and r["num_val"] == 32 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    for key in ("method", "final_mean", "best_mean", "per_client", "cuts", "labels", "wall_seconds"):
        assert key in summary, key
    assert summary["method"] == method and len(summary["per_client"]) == 4
    assert summary["best_mean"] >= summary["final_mean"]
    assert summary["final_mean"] == pytest.approx(sum(summary["per_client"]) / 4)
    partition = json.loads((out / "partition.json").read_text())
    assert [sum(c["train_label_counts"]) for c in partition["clients"]] == [48] * 4
    if method == "local":
        assert all(r["uplink_bytes"] == 0 and r["downlink_bytes"] == 0 for r in rows)
        assert summary["cuts"] == [4, 4]
    if method == "fedtreelora":
        warm = [r for r in rows if r["phase"] == "warmup"]
        assert len(warm) == 4 and all(r["downlink_bytes"] == 0 for r in warm)
        fed = [r for r in rows if r["phase"] == "federated"]
        assert all(r["downlink_bytes"] == 2 * r["uplink_bytes"] > 0 for r in fed), "two experts down, one up"


@pytest.mark.slow
def test_same_seed_same_result() -> None:
    runs = [SimulationEngine(load_config(overrides=TINY), quiet=True).run() for _ in range(2)]
    assert runs[0]["per_client"] == runs[1]["per_client"]
    assert [h["mean_train_loss"] for h in runs[0]["history"]] == [h["mean_train_loss"] for h in runs[1]["history"]]


def test_cli_rejects_unknown_key_and_method(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["run", "--set", "data.nclients=3", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "data.nclients" in err and "num_clients" in err
    assert main(["run", "--method", "fedavgx", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "fedavgx" in err and "fedtreelora" in err and "fedit" in err
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.parametrize(
    ("assignment", "message"),
    [("data.num_clients=0", "data.num_clients"), ("data.dataset=sarcasmm", "did you mean 'sarcasm'")],
    ids=["invalid-value", "unknown-dataset"],
)
def test_cli_reports_a_config_error_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, assignment: str, message: str
) -> None:
    args = ["run", "--set", "data.groups=null", "--set", "model.num_layers=1", "--set", assignment]
    assert main([*args, "--out", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err


def test_cli_lets_an_internal_error_propagate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A ValueError that is not about the user's config is a bug: it must keep its traceback."""

    def broken(self: SimulationEngine) -> dict:
        raise ValueError("internal")

    monkeypatch.setattr(SimulationEngine, "run", broken)
    with pytest.raises(ValueError, match="internal"):
        main(["run", "--set", "model.num_layers=1", "--out", str(tmp_path), "--quiet"])  # the quickstart's config


def test_yaml_config_file_and_overrides_compose(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("method: fedit\ndata:\n  num_clients: 7\nfedtreelora:\n  tau: 0.3\n")
    config = load_config(path, ["fedtreelora.tau=0.25"], seed=5)
    assert (config.method, config.data.num_clients, config.fedtreelora.tau, config.seed) == ("fedit", 7, 0.25, 5)


@pytest.mark.slow
def test_tensorboard_scalars_are_written_per_round(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = load_config(overrides=[*TINY, "method=fedit"])
    summary = SimulationEngine(config, tmp_path, quiet=True, report=False).run()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    mean = events.Scalars("accuracy/mean")
    assert [e.step for e in mean] == [1, 2, 3]
    assert [e.value for e in mean] == pytest.approx([h["mean_accuracy"] for h in summary["history"]])
    assert len(events.Scalars("accuracy/client_003")) == 3


@pytest.mark.slow
def test_bf16_autocast_trains_with_float32_adapters(tmp_path: Path) -> None:
    """bf16 autocast (the GPU default) also runs on CPU: metrics are finite and adapters stay float32."""
    from safetensors.torch import load_file

    config = load_config(overrides=[*TINY, "train.precision=bf16"])
    summary = SimulationEngine(config, tmp_path, quiet=True, report=False).run()
    assert all(0.0 <= a <= 1.0 for a in summary["per_client"])
    assert all(h["mean_train_loss"] == h["mean_train_loss"] for h in summary["history"]), "no NaN loss"
    state = load_file(str(tmp_path / "clients" / "client_000.safetensors"))
    assert all(t.dtype == torch.float32 for t in state.values())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fedtreelora", "fedalt"])
def test_server_device_run_matches_the_default_run(tmp_path: Path, method: str) -> None:
    """A whole run with the server aggregating in torch (``federation.server_device=cpu``) gives the
    default (numpy) run's metrics: the config reaches the strategy and nothing else changes."""
    overrides = [*TINY, f"method={method}", "data.n_train=32", "data.n_val=16"]  # 2 steps a round: enough to compare
    default = SimulationEngine(load_config(overrides=overrides), quiet=True).run()
    config = load_config(overrides=[*overrides, "federation.server_device=cpu"])
    engine = SimulationEngine(config, tmp_path, quiet=True, report=False)
    contexts = []
    build = engine.build_federation

    def build_and_record():  # type: ignore[no-untyped-def]
        fed = build()
        contexts.append(fed.strategy.context)
        return fed

    engine.build_federation = build_and_record  # type: ignore[method-assign]
    on_device = engine.run()
    assert [c.server_device for c in contexts] == ["cpu"]
    assert on_device["per_client"] == pytest.approx(default["per_client"], abs=1e-6)
    for a, b in zip(default["history"], on_device["history"], strict=True):
        assert b["mean_train_loss"] == pytest.approx(a["mean_train_loss"], abs=1e-5)


def test_an_override_below_a_value_names_the_setting_and_the_value() -> None:
    from fedtreelora.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--set train.lr.x: 'lr' is a value, not a section"):
        load_config(overrides=["train.lr=0.1", "train.lr.x=1"])


def test_run_without_config_is_the_quickstart_and_with_config_the_builtin_defaults(tmp_path: Path) -> None:
    from fedtreelora.config import load_run_config

    quick = load_run_config()
    assert quick == load_config(QUICKSTART) and quick.data.groups, "the default experiment plants groups"
    assert quick != load_config()
    path = tmp_path / "exp.yaml"
    path.write_text("data:\n  num_clients: 7\n")
    own = load_run_config(path)
    assert own.data.groups is None and own.data.num_clients == 7  # a file starts from the built-in defaults
    assert load_run_config(overrides=["data.groups=null", "data.num_clients=5"]).data.num_clients == 5


@pytest.mark.parametrize("key", ["data.dataset=tweets", "data.num_clients=4"])
def test_an_override_the_quickstart_groups_would_ignore_is_an_error_that_says_what_to_do(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, key: str
) -> None:
    assert main(["run", "--set", key, "--out", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert key.split("=")[0] in err and "data.groups=null" in err and "--config" in err
    assert not (tmp_path / "config.yaml").exists()


@pytest.mark.parametrize("method", ["fedtreelora", "fedit", "local", "fedlease"])
def test_the_cpu_suite_runs_the_quickstart_experiment(method: str) -> None:
    """The README's comparison table of the default experiment comes from the `cpu` suite: its runs must
    be exactly what `fedtreelora run --method M` runs (the suite only turns TensorBoard off)."""
    from fedtreelora.compare import plan_runs
    from fedtreelora.config import load_run_config
    from fedtreelora.suites import load_suite

    (spec,) = plan_runs(load_suite("cpu"), "/nonexistent", methods=[method], seeds=[0])
    quick = load_run_config(overrides=["logging.tensorboard=false"], method=method, seed=0)
    assert spec.config == quick
