"""Where a run's privacy shows: the report's Privacy section, the line ``fedtreelora run`` ends with and
``compare``'s tables, each only when privacy was on, with the numbers of the run's summary."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from fedtreelora.cli import result_line
from fedtreelora.compare import Column, RunResult, RunSpec, render_markdown, summarise, write_outputs
from fedtreelora.config import ExperimentConfig, load_config
from fedtreelora.report import write_report
from fedtreelora.runfolder import RunFolder

TINY = [
    "method=fedit",
    "model.num_layers=1",
    "model.max_length=16",
    "data.num_clients=4",
    "data.n_train=16",
    "data.n_val=8",
    "train.batch_size=8",
    "federation.rounds=2",
    "federation.fraction_train=0.5",  # sampled: the server's epsilon differs from the other clients'
    "logging.tensorboard=false",
]
PRIVATE = ["privacy.clip_norm=0.05", "privacy.noise_multiplier=0.9", "privacy.delta=1e-3"]

PRIVACY = {
    "clip_norm": 0.05, "noise_multiplier": 0.9, "target_epsilon": None, "delta": 1e-3, "accountant": "rdp",
    "adjacency": "add_remove", "sample_rate": 0.5, "planned_rounds": 2, "upload_rounds": 2, "epsilon": 6.482,
    "epsilon_server": 9.01, "per_client_epsilon_server": [4.73, 9.01, 4.73, 9.01],
}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny FedIT run with privacy on and the same run without, each with its report written."""
    from fedtreelora.engines import SimulationEngine

    out = {}
    for name, extra in (("private", PRIVATE), ("plain", [])):
        folder = tmp_path_factory.mktemp(name)
        SimulationEngine(load_config(overrides=[*TINY, *extra]), folder, quiet=True, report=False).run()
        write_report(folder)
        out[name] = folder
    return out


@pytest.mark.slow
def test_a_private_runs_report_has_a_privacy_section_with_its_numbers(runs: dict[str, Path]) -> None:
    summary = RunFolder(runs["private"]).require_run_summary()
    privacy = summary.privacy
    assert privacy is not None and privacy.epsilon is not None and privacy.epsilon_server is not None
    assert privacy.epsilon_server != privacy.epsilon
    md = (runs["private"] / "report.md").read_text()
    html = (runs["private"] / "report.html").read_text()
    section = md[md.index("## Privacy") : md.index("## Clients")]
    assert "| mechanism | Gaussian, client-level" in section
    assert "| clip norm S | 0.05 |" in section and "| noise multiplier z | 0.9 |" in section
    assert "| delta | 0.001 |" in section and "| accountant | rdp (Opacus), sampling rate q = 0.5, 2 rounds" in section
    assert f"| final epsilon against the other clients | {privacy.epsilon:.2f} (" in section
    assert f"| final epsilon against the server | {privacy.epsilon_server:.2f} (" in section
    assert "![Privacy](report_files/privacy.png)" in section
    assert (runs["private"] / "report_files" / "privacy.png").stat().st_size > 1000
    assert '<h2 id="privacy">Privacy</h2>' in html and f"{privacy.epsilon:.2f}" in html
    # The round records' epsilons are the figure's points; the last is the summary's.
    assert [h.epsilon for h in summary.history][-1] == privacy.epsilon


@pytest.mark.slow
def test_a_run_without_privacy_has_no_privacy_anywhere(runs: dict[str, Path]) -> None:
    md = (runs["plain"] / "report.md").read_text()
    html = (runs["plain"] / "report.html").read_text()
    assert "Privacy" not in md and 'id="privacy"' not in html and "epsilon" not in md
    assert not (runs["plain"] / "report_files" / "privacy.png").exists()
    summary = RunFolder(runs["plain"]).require_run_summary()
    assert summary.privacy is None and all(not h.has_privacy for h in summary.history)


def _summary(privacy: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "method": "fedit", "dataset": "tweets", "metric": "accuracy", "evaluate": "received", "final_mean": 0.5,
        "best_mean": 0.6, "best_round": 0, "best_federated_mean": 0.6, "best_federated_round": 0, "cuts": [1],
        "wall_seconds": 3.0, "trainable_params_per_client": 10, "backbone_params": 1000, "history": [],
        **({} if privacy is None else {"privacy": privacy}),
    }  # fmt: skip


def test_the_run_line_gives_the_epsilons_only_with_privacy_on() -> None:
    line = result_line(_summary(PRIVACY), Path("runs/x"))
    assert "; privacy: epsilon 6.48 (9.01 against the server) at delta 0.001; cuts [1]" in line
    same = result_line(_summary({**PRIVACY, "epsilon_server": 6.482}), Path("runs/x"))
    assert "privacy: epsilon 6.48 at delta 0.001; " in same
    unbounded = result_line(_summary({**PRIVACY, "epsilon": None, "epsilon_server": None}), Path("runs/x"))
    assert "privacy: epsilon unbounded at delta 0.001; " in unbounded
    assert "privacy" not in result_line(_summary(None), Path("runs/x"))


@pytest.fixture(scope="module")
def config() -> ExperimentConfig:
    return load_config()


def _runs(config: ExperimentConfig, private: set[str]) -> list[RunResult]:
    return [
        RunResult(
            RunSpec("tweets", method, seed, config, Path("x") / method / f"seed{seed}"),
            _summary({**PRIVACY, "epsilon": 6.0 + seed} if method in private else None),
            "reused",
            0.0,
        )
        for method in ("local", "fedit")
        for seed in (1, 2)
    ]


META = {
    "suite": "fake", "sources": {"tweets": "tweets"}, "seeds": [1, 2], "command": "fedtreelora compare",
    "machine": "here", "finished": "now", "metric": "accuracy", "evaluate": "received",
}  # fmt: skip


def test_compare_shows_epsilon_only_when_some_run_had_privacy_on(config: ExperimentConfig, tmp_path: Path) -> None:
    columns = [Column("tweets", "tweets")]
    private = _runs(config, {"fedit"})
    rows = summarise(private, ["tweets"], ["local", "fedit"], columns)
    local, fedit = rows
    assert fedit["epsilon"] == pytest.approx(7.5) and fedit["epsilon_server"] == pytest.approx(9.01)
    assert local["epsilon"] != local["epsilon"], "NaN: privacy off"
    markdown = render_markdown(rows, ["tweets"], META)
    assert "| epsilon (other clients / server) |" in markdown
    assert "| 7.50 / 9.01 |" in markdown and "| - / - |" in markdown and "epsilon: the final epsilon" in markdown
    files = write_outputs(tmp_path / "private", rows, private, ["tweets"], META)
    with files["table.csv"].open() as f:
        header = next(csv.reader(f))
    assert header[-2:] == ["epsilon", "epsilon_server"]
    record = json.loads(files["compare.json"].read_text())
    assert [r.get("epsilon") for r in record["runs"]] == [None, None, 7.0, 8.0]

    plain = _runs(config, set())
    rows = summarise(plain, ["tweets"], ["local", "fedit"], columns)
    assert all("epsilon" not in r for r in rows)
    files = write_outputs(tmp_path / "plain", rows, plain, ["tweets"], META)
    assert "epsilon" not in files["table.md"].read_text() and "epsilon" not in files["table.csv"].read_text()
    assert "epsilon" not in files["compare.json"].read_text()
