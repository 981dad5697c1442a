"""The depth suite and benchmarks/bench_depth.py's tables and plot, from fake run summaries (no training)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from fedtreelora.compare import plan_runs, run_folder
from fedtreelora.strategies.fedit import resolve_shared_layers
from fedtreelora.suites import load_suite

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_depth  # noqa: E402

ROWS = [f"share-first-{d}" for d in range(7)] + ["share-last-3"]
LEVELS = ["iid", "two-tasks", "swapped"]
FAKE_LEVELS = ["alpha-100", "alpha-1", "alpha-0.1"]  # level names of the fake summaries below


def test_the_depth_suite_sweeps_the_shared_depth_over_heterogeneity_levels() -> None:
    suite = load_suite("depth")
    assert suite.default_methods() == ROWS and list(suite.datasets) == LEVELS and suite.seeds == (0, 1, 2)
    configs = suite.validate()  # every row of a level sees the same partition
    assert len(configs) == len(ROWS) * len(LEVELS)
    groups: dict[str, set] = {}
    for config in configs:
        assert config.method == "fedit" and config.model.num_layers == 6
        planted = tuple(g.name for g in config.data.groups or ())
        groups.setdefault(planted, set()).add(config.fedit.shared_layers)
    # one level without groups, and two whose 8 clients split 4 + 4 into planted groups
    assert sorted(groups) == [(), ("sarcasm", "tweets"), ("sarcasm/plain", "sarcasm/swapped")]
    assert all(len(rows) == len(ROWS) for rows in groups.values())
    shared = {row: resolve_shared_layers(suite.resolve(row, "two-tasks", 0).fedit.shared_layers, 6) for row in ROWS}
    assert shared["share-first-0"] == () and shared["share-first-6"] == tuple(range(6))
    assert shared["share-first-3"] == (0, 1, 2) and shared["share-last-3"] == (3, 4, 5)
    assert len(plan_runs(suite, "/nonexistent")) == len(ROWS) * len(LEVELS) * 3


def test_row_names() -> None:
    assert bench_depth.row_depth("share-first-4") == ("first", 4)
    assert bench_depth.row_depth("share-last-3") == ("last", 3)
    assert bench_depth.row_depth("fedit") is None
    first, last = bench_depth.depth_columns(["share-last-3", "share-first-2", "fedit", "share-first-0"])
    assert first == [(0, "share-first-0"), (2, "share-first-2")] and last == [(3, "share-last-3")]


def summary(received: float, trained: float) -> dict[str, Any]:
    """A run summary as far as the benchmark reads it."""
    by = {
        "received": {"best_mean": received, "final_mean": received - 0.01},
        "trained": {"best_mean": trained, "final_mean": trained - 0.01},
    }
    return {"by_convention": by}


FAKE = {
    ("alpha-1", "share-first-0", 0): summary(0.80, 0.80),
    ("alpha-1", "share-first-0", 1): summary(0.84, 0.84),
    ("alpha-1", "share-first-3", 0): summary(0.90, 0.88),
    ("alpha-1", "share-first-3", 1): summary(0.86, 0.88),
    ("alpha-1", "share-last-3", 0): summary(0.70, 0.85),
    ("alpha-0.1", "share-first-0", 0): summary(0.95, 0.95),
}


def test_gather_and_table() -> None:
    scores = bench_depth.gather(FAKE, "received", "best_mean")
    assert scores["alpha-1"]["share-first-3"] == [0.90, 0.86]
    assert bench_depth.gather(FAKE, "trained", "final_mean")["alpha-1"]["share-last-3"] == [pytest.approx(0.84)]
    rows = ["share-first-0", "share-first-3", "share-last-3"]
    table = bench_depth.depth_table(
        scores, ["alpha-1", "alpha-0.1", "alpha-100"], rows, {"alpha-1": "alpha-1 (Dirichlet α 1)"},
        {"alpha-1": [0.75, 0.77]}, num_layers=3,
    )  # fmt: skip
    lines = table.splitlines()
    assert lines[0] == "| level | seeds | d=0 (local) | d=3 (FedIT) | last 3 only | majority class |"
    assert lines[2] == "| alpha-1 (Dirichlet α 1) | 2 | 82.00 ± 2.83 | **88.00 ± 2.83** | 70.00 ± 0.00 | 76.00 ± 1.41 |"
    assert lines[3] == "| alpha-0.1 | 1 | **95.00 ± 0.00** | n/a | n/a | n/a |"
    assert lines[4] == "| alpha-100 | 0 | n/a | n/a | n/a | n/a |", "a level with no finished run stays in the table"


def test_curves_and_plot(tmp_path: Path) -> None:
    received = bench_depth.curves(bench_depth.gather(FAKE, "received", "best_mean"), FAKE_LEVELS, ROWS)
    assert list(received) == ["alpha-1", "alpha-0.1"], "levels in the suite's order"
    assert received["alpha-1"][("first", 3)] == pytest.approx((88.0, 2.8284271))
    assert received["alpha-1"][("last", 3)] == pytest.approx((70.0, 0.0))
    assert set(received["alpha-0.1"]) == {("first", 0)}
    trained = bench_depth.curves(bench_depth.gather(FAKE, "trained", "best_mean"), FAKE_LEVELS, ROWS)
    path = bench_depth.plot_depth(
        {"received": received, "trained": trained}, tmp_path / "p" / "depth.png", num_layers=6
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def write_run(out: Path, level: str, row: str, seed: int, received: float, counts: list[list[int]]) -> None:
    folder = run_folder(out, level, row, seed)
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary(received, received)))
    clients = [{"client": k, "val_label_counts": c} for k, c in enumerate(counts)]
    (folder / "partition.json").write_text(json.dumps({"clients": clients}))


def test_outputs_from_run_folders(tmp_path: Path) -> None:
    write_run(tmp_path, "alpha-1", "share-first-0", 0, 0.8, [[3, 1], [1, 1]])
    write_run(tmp_path, "alpha-1", "share-first-6", 0, 0.7, [[3, 1], [1, 1]])
    write_run(tmp_path, "alpha-1", "share-first-0", 5, 0.1, [[1, 1]])  # a seed not asked for
    found = bench_depth.read_summaries(tmp_path, ["alpha-1", "alpha-0.1"], ROWS, [0, 1])
    assert set(found) == {("alpha-1", "share-first-0", 0), ("alpha-1", "share-first-6", 0)}
    majority = bench_depth.majority_rates(tmp_path, ["alpha-1"], ROWS, [0, 1])
    assert majority == {"alpha-1": [pytest.approx(0.625)]}
    md, png = bench_depth.write_outputs(tmp_path, found, ["alpha-1"], ROWS, {}, majority, 6, "header")
    text = md.read_text()
    for title in ("## received, best round", "## received, final round", "## trained, best round"):
        assert title in text
    assert "| alpha-1 | 1 | **80.00 ± 0.00** |" in text and "d=6 (FedIT)" in text and "last 3 only" in text
    assert png.is_file()
