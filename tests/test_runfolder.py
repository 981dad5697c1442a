"""The run folder's layout: what the recorder writes, RunFolder reads back; missing and broken files;
and no other module knows the file names."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import fedtreelora
from fedtreelora.compare import _read_summary
from fedtreelora.config import ConfigError, load_config
from fedtreelora.engines.recorder import RunRecorder
from fedtreelora.headline import complete_summary
from fedtreelora.report import load_run
from fedtreelora.runfolder import (
    ClientRecord,
    ComparisonFolder,
    Convention,
    Headline,
    RoundRecord,
    RunFolder,
    RunSummary,
    write_json,
)

PACKAGE = Path(fedtreelora.__file__).parent
#: the layout's file names, which only runfolder.py may spell out
LAYOUT_NAMES = ("summary.json", "metrics.jsonl", "partition.json", "meta.json")

PARTITION = {"clients": [{"train_label_counts": [3, 1]}, {"train_label_counts": [0, 4]}], "label_names": ["a", "b"]}
SUMMARY = {"method": "fedit", "best_mean": 0.75, "final_mean": float("nan"), "cuts": (0, 1)}
META = {"method": "fedit", "sites": [{"name": "enc.0.q", "layer": 0, "module": "q"}]}


def record(rnd: int, client: int) -> dict[str, object]:
    return {"round": rnd, "client": client, "accuracy": np.float64(0.5), "eval_loss": float("inf")}


@pytest.fixture
def written(tmp_path: Path) -> tuple[RunFolder, list[dict[str, torch.Tensor]]]:
    """A run folder written by the recorder, as an engine writes it: client 1's state held elsewhere."""
    recorder = RunRecorder(tmp_path / "run")
    recorder.truncate_metrics(0)
    recorder.write_config(load_config(method="fedit", seed=3))
    recorder.write_partition(PARTITION)
    recorder.log_clients([record(0, 0), record(0, 1)])
    recorder.log_clients([record(1, 0)])
    states = [
        {"enc.0.q.shared.lora_A": torch.arange(6.0).reshape(2, 3), "enc.0.q.mix_logit": torch.tensor(0.0)},
        {},
        {"enc.0.q.shared.lora_A": torch.ones(2, 3), "enc.0.q.mix_logit": torch.tensor(2.0)},
    ]
    recorder.write_client_states(states, META)
    recorder.write_summary(SUMMARY)
    assert recorder.folder is not None
    return recorder.folder, states


def test_what_the_recorder_writes_reads_back(written: tuple[RunFolder, list[dict[str, torch.Tensor]]]) -> None:
    folder, states = written
    config = folder.read_config()
    assert (config.method, config.seed) == ("fedit", 3)
    assert folder.read_config_dict() == config.model_dump(mode="json")
    assert folder.read_partition() == PARTITION
    assert folder.read_partition_text() == json.dumps(PARTITION, indent=2) + "\n"
    rows = folder.read_metrics()
    assert [(r["round"], r["client"]) for r in rows] == [(0, 0), (0, 1), (1, 0)]
    assert rows[0]["accuracy"] == 0.5 and rows[0]["eval_loss"] is None, "numpy as numbers, non-finite as null"
    summary = folder.read_summary()
    assert summary == {"method": "fedit", "best_mean": 0.75, "final_mean": None, "cuts": [0, 1]}
    assert folder.require_summary() == summary
    assert folder.read_client_meta() == META
    assert folder.saved_clients() == [0, 2], "a state held elsewhere is not written"
    assert folder.client_state_files() == [folder.client_state_file(0), folder.client_state_file(2)]
    for k in (0, 2):
        loaded = folder.client_state(k)
        assert loaded.keys() == states[k].keys()
        assert all(torch.equal(loaded[key], states[k][key]) for key in loaded)
    arrays = folder.client_arrays(2, ["enc.0.q.mix_logit"])
    assert list(arrays) == ["enc.0.q.mix_logit"] and float(arrays["enc.0.q.mix_logit"]) == 2.0
    assert not list(folder.root.rglob("*.tmp")), "atomic writes leave no temporary files"


def test_received_models_are_written_beside_the_trained_ones(tmp_path: Path) -> None:
    """The received models go to their own folder, one file per client that has one; a rerun in the
    same folder leaves no received model of the earlier run behind; the trained ones are unchanged."""
    recorder = RunRecorder(tmp_path)
    trained = [{"x": torch.zeros(2)}, {"x": torch.ones(2)}, {"x": torch.full((2,), 2.0)}]
    recorder.write_client_states(trained, META, {0: {"x": torch.full((2,), 5.0)}, 2: {"x": torch.full((2,), 7.0)}})
    folder = RunFolder(tmp_path)
    assert folder.saved_clients() == folder.saved_clients("trained") == [0, 1, 2]
    assert folder.saved_clients("received") == [0, 2]
    assert folder.client_state_file(2, "received").parent == folder.received_dir != folder.clients_dir
    assert folder.client_state(2, "received")["x"].tolist() == [7.0, 7.0]
    assert folder.client_state(2)["x"].tolist() == [2.0, 2.0], "the trained model by default"
    assert float(folder.client_arrays(0, ["x"], "received")["x"][0]) == 5.0
    recorder.write_client_states(trained, META, {2: {"x": torch.full((2,), 8.0)}})
    assert folder.saved_clients("received") == [2], "the earlier run's received model of client 0 is gone"
    recorder.write_client_states(trained, META)
    assert folder.saved_clients("received") == [] and folder.saved_clients() == [0, 1, 2]
    with pytest.raises(ValueError, match="unknown client model 'final'"):
        folder.client_state_file(0, "final")  # type: ignore[arg-type]


def test_report_reads_the_same_folder(written: tuple[RunFolder, list[dict[str, torch.Tensor]]]) -> None:
    folder, _ = written
    run = load_run(folder.root)
    assert run.folder == folder
    # A summary written before the best federated round was recorded gets it from its history.
    assert (run.summary, run.metrics, run.partition, run.meta) == (
        complete_summary(folder.require_summary(), folder.read_metrics()),
        folder.read_metrics(),
        folder.read_partition(),
        folder.read_client_meta(),
    )
    assert run.client_files() == folder.client_state_files()


def test_report_and_compare_complete_an_old_summary_through_one_reader(tmp_path: Path) -> None:
    """A summary written before the best federated round was recorded: RunFolder.read_complete_summary
    fills it in from the history and the per-client records, and the report and compare read that."""
    history = [{"round": r, "phase": phase, "mean_metric": m, "received_mean_metric": m, "trained_mean_metric": 0.5}
               for r, (phase, m) in enumerate([("warmup", 0.9), ("federated", 0.6), ("federated", 0.7)])]  # fmt: skip
    old = {"method": "fedtreelora", "metric": "accuracy", "evaluate": "received", "num_clients": 2,
           "final_mean": 0.7, "best_mean": 0.9, "best_round": 0, "per_client": [0.6, 0.8], "history": history,
           "by_convention": {"received": {"final_mean": 0.7, "best_mean": 0.9, "best_round": 0}}}  # fmt: skip
    folder = RunFolder(tmp_path)
    folder.write_summary(old)
    folder.append_metrics([{"round": r, "client": k, "received_accuracy": 0.1 * r + k / 2} for r in range(3)
                           for k in range(2)])  # fmt: skip
    done = folder.read_complete_summary()
    assert done == complete_summary(old, folder.read_metrics())
    assert (done.best_federated_mean, done.best_federated_round) == (0.7, 2)
    assert done.headlines == {Convention.RECEIVED: Headline(0.7, 0.9, 0, 0.7, 2)}
    assert done.per_client_at("best_federated_mean") == pytest.approx([0.2, 0.7])
    assert folder.require_complete_summary() == done
    assert load_run(tmp_path).summary == done and _read_summary(tmp_path) == done
    # A complete summary is read as written; the per-client records are not needed.
    folder.write_summary(done)
    folder.metrics.unlink()
    assert folder.read_complete_summary() == done and folder.read_complete_summary().is_complete
    assert RunFolder(tmp_path / "none").read_complete_summary() is None


def test_truncating_metrics_keeps_earlier_rounds_verbatim(
    written: tuple[RunFolder, list[dict[str, torch.Tensor]]],
) -> None:
    folder, _ = written
    first_round = folder.metrics.read_text().splitlines()[:2]
    folder.truncate_metrics(1)
    assert folder.metrics.read_text().splitlines() == first_round
    folder.truncate_metrics(0)
    assert folder.metrics.read_text() == "" and folder.read_metrics() == []


def test_an_empty_folder_has_nothing_to_read(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    assert folder.read_summary() is None
    with pytest.raises(FileNotFoundError, match=folder.summary.name):
        folder.require_summary()
    with pytest.raises(FileNotFoundError, match="finished run folder"):
        load_run(tmp_path)
    assert folder.read_metrics() == []
    assert folder.read_partition() is None and folder.read_partition_text() is None
    assert folder.read_client_meta() is None
    assert folder.read_config_dict() == {}
    with pytest.raises(ConfigError):
        folder.read_config()
    assert folder.client_state_files() == [] and folder.saved_clients() == []
    assert folder.client_state_files("received") == [] and folder.saved_clients("received") == []
    assert not folder.has_checkpoint()


@pytest.mark.parametrize("text", ["{", "[1, 2]", '"done"'])
def test_a_broken_summary_means_not_finished(tmp_path: Path, text: str) -> None:
    folder = RunFolder(tmp_path)
    folder.summary.write_text(text)
    assert folder.read_summary() is None
    assert _read_summary(tmp_path) is None


def test_a_summary_without_headline_is_not_a_finished_comparison_run(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    folder.write_summary({"method": "fedit"})
    assert folder.read_summary() == {"method": "fedit"}
    assert _read_summary(tmp_path) is None, "compare reuses only a run whose summary has its headline"
    folder.write_summary({"method": "fedit", "best_mean": math.pi})
    summary = _read_summary(tmp_path)
    assert summary is not None and summary["best_mean"] == math.pi and summary["method"] == "fedit"
    assert summary["best_federated_mean"] is None, "a summary without a history has no federated round"


def test_a_recorder_without_folder_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    recorder = RunRecorder(None)
    recorder.truncate_metrics(0)
    recorder.write_partition(PARTITION)
    recorder.log_clients([record(0, 0)])
    recorder.write_client_states([{"x": torch.zeros(1)}], META)
    recorder.write_summary(SUMMARY)
    assert recorder.folder is None and list(tmp_path.iterdir()) == []


def test_a_str_path_is_accepted() -> None:
    assert RunFolder("some/run") == RunFolder(Path("some/run"))  # type: ignore[arg-type]
    assert RunFolder(Path("r")).client_state_file(7).name.endswith("007.safetensors")


def test_only_runfolder_knows_the_file_names() -> None:
    """The layout stays in one place: no other module of the package spells out a run file's name."""
    offenders = [
        f"{path.relative_to(PACKAGE)}: {name}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "runfolder.py"
        for name in LAYOUT_NAMES
        if name in path.read_text()
    ]
    assert offenders == []


def test_runfolder_imports_neither_torch_nor_engines() -> None:
    """Reading a run's numbers must not need torch (imported lazily for tensors) or the engines."""
    tree = ast.parse((PACKAGE / "runfolder.py").read_text())
    imported = set()
    for node in tree.body:  # module level only; TYPE_CHECKING blocks are annotations
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert imported <= {"__future__", "json", "math", "os", "collections.abc", "dataclasses", "enum", "pathlib",
                        "typing",
                        "numpy", "yaml", "fedtreelora.config"}  # fmt: skip


# --- typed records -------------------------------------------------------------------------------------

QUICKSTART_RUN = Path(__file__).resolve().parent / "data" / "quickstart_run"
"""summary.json and the first twelve lines of metrics.jsonl (rounds 1 and 2) of `fedtreelora run` (the quickstart, seed 0, 2026-12-04)."""


def test_each_convention_knows_the_other_and_says_what_it_scores() -> None:
    assert Convention.RECEIVED.other is Convention.TRAINED
    assert Convention.TRAINED.other is Convention.RECEIVED
    assert {c.other.other for c in Convention} == set(Convention)
    assert "receives after aggregation" in Convention.RECEIVED.description
    assert "local training" in Convention.TRAINED.description
    assert Convention.RECEIVED.description != Convention.TRAINED.description
    assert Convention.RECEIVED.score_key("rouge1") == "received_rouge1"
    assert Convention.TRAINED.score_key("rouge1") == "rouge1"
    assert Convention.TRAINED.mean_key == "trained_mean_metric"
    assert f"{Convention.RECEIVED}" == "received" and Convention("trained") is Convention.TRAINED


def test_a_run_written_before_the_setting_scored_after_local_training() -> None:
    assert Convention.of(None) is Convention.TRAINED
    assert Convention.of("received") is Convention.RECEIVED
    with pytest.raises(ValueError):
        Convention.of("sideways")


def test_an_old_summary_reads_with_the_defaults_of_its_time() -> None:
    """A summary written before metric, evaluate, num_clients, by_convention and the best federated round
    were recorded: the keys it lacks take the defaults of the runs of its time."""
    old = RunSummary({"method": "fedit", "final_mean": 0.5, "best_mean": 0.625, "best_round": 1,
                      "per_client": [0.5, 0.5, None], "history": [{"round": 0, "mean_accuracy": 0.25},
                                                                  {"round": 1, "mean_accuracy": 0.625}]})  # fmt: skip
    assert old.metric == "accuracy" and old.evaluate is Convention.TRAINED and old.score_key == "accuracy"
    assert old.num_clients == 3 and old.num_rounds == 2
    assert old.headline == Headline(0.5, 0.625, 1, None, None)
    assert old.by_convention(Convention.RECEIVED) is None
    assert [h.mean for h in old.history] == [0.25, 0.625], "mean_accuracy before mean_metric existed"
    assert old.history[0].phase is None and old.warmup_rounds == []
    assert old.cuts is None and old.client_categories == [] and old.per_client_at("best_mean") == []
    assert old.dataset is None and old.finding is None and old.wall_seconds is None


def test_a_real_summary_reads_as_written() -> None:
    path = QUICKSTART_RUN / "summary.json"
    raw = json.loads(path.read_text())
    summary = RunFolder(path.parent).require_run_summary()
    assert summary == raw and summary.to_dict() == raw, "every key kept, unchanged"
    assert summary.evaluate is Convention(raw["evaluate"])
    assert summary.best_round == raw["best_round"] and summary.final_mean == raw["final_mean"]
    other = summary.by_convention(summary.evaluate.other)
    assert other is not None and other.best_mean == raw["by_convention"][str(summary.evaluate.other)]["best_mean"]
    assert [h.mean for h in summary.history] == [h["mean_metric"] for h in raw["history"]]
    assert summary.warmup_rounds == [h["round"] for h in raw["history"] if h["phase"] == "warmup"]


def test_a_client_record_round_trips_from_a_real_metrics_line(tmp_path: Path) -> None:
    line = (QUICKSTART_RUN / "metrics.jsonl").read_text().splitlines()[0]
    raw = json.loads(line)
    folder = RunFolder(tmp_path)
    folder.append_metrics([ClientRecord(raw), ClientRecord({"round": 1, "client": 2, "trained": False,
                                                            "received_accuracy": 0.5})])  # fmt: skip
    assert folder.metrics.read_text().splitlines()[0] == line, "written back byte for byte"
    first, sat_out = folder.read_client_records()
    assert first == raw and (first.round, first.client, first.phase) == (0, 0, "warmup") and first.trained
    assert first.score("accuracy", Convention.TRAINED) == raw["accuracy"]
    assert first.score("accuracy", Convention.RECEIVED) == raw["received_accuracy"]
    assert first.train_loss == raw["train_loss"]
    assert not sat_out.trained and sat_out.train_loss is None and sat_out.score("accuracy", Convention.TRAINED) is None


def test_a_round_record_prefers_mean_metric_and_reads_each_convention() -> None:
    record = RoundRecord({"round": 2, "phase": "cluster", "mean_metric": 0.7, "mean_accuracy": 0.1,
                          "received_mean_metric": 0.7, "trained_mean_metric": 0.6, "uplink_mb_per_client": None})  # fmt: skip
    assert record.mean == 0.7 and record.round == 2 and record.phase == "cluster"
    assert record.convention_mean(Convention.TRAINED) == 0.6 and record.convention_mean(Convention.RECEIVED) == 0.7
    assert record.uplink_mb == 0.0 and record.downlink_mb == 0.0 and record.mean_train_loss is None


def test_a_comparison_folder_lists_its_finished_runs(tmp_path: Path) -> None:
    from fedtreelora.compare import run_folder

    comparison = ComparisonFolder(str(tmp_path))
    for dataset, method, seed, finished in [("tweets", "fedit", 10, True), ("tweets", "fedit", 2, True),
                                            ("tweets", "local", 0, False), ("sarcasm", "fedit", 0, True)]:  # fmt: skip
        run = comparison.run(dataset, method, seed)
        assert run.root == run_folder(tmp_path, dataset, method, seed)
        run.root.mkdir(parents=True)
        if finished:
            run.write_summary({"method": method, "best_mean": 0.5})
    (comparison.runs_dir / "tweets" / "fedit" / "notes").mkdir()  # not a seed folder
    found = [(d, m, s) for d, m, s, run in comparison.runs()]
    assert found == [("sarcasm", "fedit", 0), ("tweets", "fedit", 2), ("tweets", "fedit", 10)]
    assert all(run.require_run_summary().has_headline for *_, run in comparison.runs())
    with pytest.raises(FileNotFoundError):
        comparison.read_compare()
    write_json(comparison.compare_json, {"rows": []})
    assert comparison.read_compare() == {"rows": []}


def test_a_convention_may_be_named() -> None:
    summary = RunSummary({"by_convention": {"trained": {"best_mean": 0.5}}, "evaluate": "received"})
    assert (
        summary.by_convention("trained")
        == summary.by_convention(Convention.TRAINED)
        == Headline(None, 0.5, None, None, None)
    )
    assert ClientRecord({"round": 0, "client": 0, "received_rouge1": 0.25}).score("rouge1", "received") == 0.25
    assert RoundRecord({"round": 0, "trained_mean_metric": 0.5}).convention_mean("trained") == 0.5


def test_privacy_is_read_where_it_was_recorded() -> None:
    assert RunSummary({"method": "fedit"}).privacy is None
    assert RunSummary({"privacy": {"epsilon": 4.0}}).privacy == {"epsilon": 4.0}
    assert RoundRecord({"round": 0}).epsilon is None and RoundRecord({"round": 0, "epsilon": 1.5}).epsilon == 1.5


def test_the_privacy_record_and_round_epsilons_are_typed() -> None:
    privacy = RunSummary({"privacy": {"clip_norm": 0.05, "noise_multiplier": 1, "target_epsilon": None, "delta": 1e-5,
                                      "accountant": "rdp", "adjacency": "add_remove", "sample_rate": 0.5,
                                      "upload_rounds": 3, "epsilon": 6.5, "epsilon_server": None,
                                      "per_client_epsilon_server": [4.7, None]}}).privacy  # fmt: skip
    assert privacy is not None
    assert (privacy.clip_norm, privacy.noise_multiplier, privacy.target_epsilon) == (0.05, 1.0, None)
    assert (privacy.delta, privacy.accountant, privacy.adjacency) == (1e-5, "rdp", "add_remove")
    assert (privacy.sample_rate, privacy.upload_rounds) == (0.5, 3)
    assert (privacy.epsilon, privacy.epsilon_server, privacy.per_client_epsilon_server) == (6.5, None, [4.7, None])
    on = RoundRecord({"round": 0, "epsilon": None, "epsilon_server": 2.5})
    assert on.has_privacy and on.epsilon is None and on.epsilon_server == 2.5, "None: unbounded"
    assert not RoundRecord({"round": 0}).has_privacy


def test_a_round_record_reads_who_counted_who_was_rejected_and_what_the_server_said() -> None:
    record = RoundRecord({"round": 2, "clients": [0, 2], "rejected": [1], "server": {"cuts": [2, 1]}})
    assert (record.clients, record.rejected, record.server) == ([0, 2], [1], {"cuts": [2, 1]})
    assert (RoundRecord({"round": 0}).clients, RoundRecord({"round": 0}).rejected) == ([], [])
    assert RoundRecord({"round": 0, "server": None}).server == {}
