"""benchmarks/bench_tree_choice.py: its numbers against hand-computed ones, from a hand-made compare.json."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from fedtreelora.suites import load_suite

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_tree_choice  # noqa: E402

#: dataset -> row -> final accuracy (fraction) of seeds 0, 1, 2
FINAL = {
    "a": {
        "local": [0.80, 0.70, 0.75],
        "fedit": [0.60, 0.65, 0.70],
        "fedtreelora": [0.50, 0.55, 0.60],
        "tau-0.0": [0.70, 0.72, 0.74],
        "fedtreelora-auto": [0.52, 0.54, 0.65],
    },
    "b": {
        "local": [0.50, 0.50, 0.50],
        "fedit": [0.70, 0.70, 0.76],
        "fedtreelora": [0.71, 0.71, 0.77],
        "tau-0.0": [0.60, 0.61, 0.62],
        "fedtreelora-auto": [0.71, 0.71, 0.77],
    },
}


def compare_json() -> dict[str, Any]:
    runs = [
        {"dataset": d, "method": m, "seed": s, "final_mean": v, "best_mean": v + 0.01}
        for d, rows in FINAL.items()
        for m, values in rows.items()
        for s, v in enumerate(values)
    ]
    return {"suite": "fake", "evaluate": "received", "runs": runs}


def test_reference_is_the_better_of_local_and_fedit_and_gaps_are_paired() -> None:
    by = bench_tree_choice.scores(compare_json()["runs"], "final_mean")
    assert bench_tree_choice.reference(by["a"]) == "local" and bench_tree_choice.reference(by["b"]) == "fedit"
    mean, std, n, star = bench_tree_choice.paired(by["a"]["fedtreelora"], by["a"]["local"])
    # differences -30, -15, -15 points: mean -20, sample std sqrt(75) = 8.66, SE 5.0 -> beyond 2 SE
    assert n == 3 and mean == pytest.approx(-20.0) and std == pytest.approx(75**0.5) and star
    mean, std, _, star = bench_tree_choice.paired(by["b"]["fedtreelora"], by["b"]["fedit"])
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-9)


def test_report_names_the_best_fixed_tau_and_the_worst_gap() -> None:
    text = bench_tree_choice.report(compare_json(), {"tau-0.0": 0.0, "fedtreelora": 0.3}, "fedtreelora-auto")
    final = text.split("## Best round")[0]
    # dataset a: best fixed tau 0.0 (72.00 ± 2.00); auto 57.00 ± 7.00, outside the spread; paired
    # differences -18, -18, -9: mean -15, sample std sqrt(27) = 5.20
    assert "| a | 0.0 | 72.00 ± 2.00 | 57.00 ± 7.00 | -15.00 ± 5.20* | no |" in final
    # dataset b: best fixed tau 0.3, auto identical: inside the spread
    assert "| b | 0.3 | 73.00 ± 3.46 | 73.00 ± 3.46 | +0.00 ± 0.00 | yes |" in final
    # tau 0.3 row: -20 on a (against local), +1 on b (against fedit); worst -20
    assert "| fedtreelora (tau 0.3) | -20.00 ± 8.66* | +1.00 ± 0.00* | -20.00 |" in final


def test_the_suite_it_reads_has_every_row_it_needs() -> None:
    suite = load_suite("nlu-cpu-tree")
    rows = set(suite.default_methods())
    assert {"local", "fedit", "fedtreelora-auto", *bench_tree_choice.DEFAULT_FIXED} <= rows
    assert suite.validate()
