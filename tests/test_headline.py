"""The headline numbers of a run: the best round (as the papers report it, possibly a warm-up round), the
best federated round (the best after warm-up), and how both reach a summary written before the second
existed and the line ``fedtreelora run`` ends with. Nothing trains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedtreelora.cli import result_line
from fedtreelora.headline import complete_summary, first_federated_round, headline

PHASES = ["warmup", "warmup", "federated", "federated", "federated"]
RECEIVED = [0.80, 0.62, 0.66, 0.75, 0.72]  # the best round is warm-up round 0; after warm-up, round 3
TRAINED = [0.80, 0.83, 0.79, 0.81, 0.78]


def _history(phases: list[str] = PHASES) -> list[dict[str, Any]]:
    """Round records as the engine writes them, scored ``received``."""
    return [
        {"round": r, "phase": phase, "mean_metric": RECEIVED[r], "mean_accuracy": RECEIVED[r],
         "received_mean_metric": RECEIVED[r], "trained_mean_metric": TRAINED[r]}
        for r, phase in enumerate(phases)
    ]  # fmt: skip


def test_the_best_round_may_be_warmup_the_best_federated_round_never_is() -> None:
    history = _history()
    assert first_federated_round(history) == 2
    assert headline(history, "received_mean_metric") == {
        "final_mean": 0.72,
        "best_mean": 0.80,
        "best_round": 0,
        "best_federated_mean": 0.75,
        "best_federated_round": 3,
    }
    # Under the other convention the best round is warm-up round 1.
    trained = headline(history, "trained_mean_metric")
    assert (trained["best_round"], trained["best_federated_round"]) == (1, 3)


@pytest.mark.parametrize("phase", ["federated", "local"])
def test_without_warmup_every_round_counts(phase: str) -> None:
    history = _history([phase] * 5)
    assert first_federated_round(history) == 0
    best = headline(history, "received_mean_metric")
    assert (best["best_federated_mean"], best["best_federated_round"]) == (best["best_mean"], best["best_round"])


def test_a_run_that_ended_in_warmup_or_recorded_no_phases_has_no_federated_round() -> None:
    assert headline(_history(["warmup"] * 5), "received_mean_metric")["best_federated_round"] is None
    history = [{k: v for k, v in h.items() if k != "phase"} for h in _history()]
    assert first_federated_round(history) is None
    assert headline(history, "received_mean_metric")["best_federated_mean"] is None
    assert headline([], "received_mean_metric")["final_mean"] is None


def _old_summary() -> dict[str, Any]:
    """A summary as runs wrote it before the best federated round was recorded."""
    history = _history()
    return {
        "method": "fedtreelora", "dataset": "toy", "metric": "accuracy", "evaluate": "received", "num_clients": 2,
        "final_mean": 0.72, "best_mean": 0.80, "best_round": 0, "history": history, "per_client": [0.7, 0.74],
        "by_convention": {name: {k: headline(history, f"{name}_mean_metric")[k]
                                 for k in ("final_mean", "best_mean", "best_round")}
                          for name in ("received", "trained")},
    }  # fmt: skip


def test_an_old_summary_gets_the_best_federated_round_from_its_history_and_metrics() -> None:
    rows = [
        {"round": r, "client": k, "accuracy": 0.5, "received_accuracy": 0.1 * r + 0.01 * k}
        for r in range(5)
        for k in range(2)
        if (r, k) != (3, 1)  # client 1 sat out round 3 and was not scored then (runs of that time)
    ]
    old = _old_summary()
    done = complete_summary(old, rows)
    assert "best_federated_mean" not in old, "the summary read is not changed"
    assert (done["best_federated_mean"], done["best_federated_round"]) == (0.75, 3)
    assert done["by_convention"]["received"]["best_federated_round"] == 3
    assert done["by_convention"]["trained"]["best_federated_mean"] == 0.81
    assert done["by_convention"]["trained"]["best_round"] == 1, "what was recorded stays"
    # each client's received score at round 3, or its last one before it
    assert done["per_client_best_federated_round"] == pytest.approx([0.30, 0.21])
    old["evaluate"] = "trained"
    assert complete_summary(old, rows)["per_client_best_federated_round"] == [0.5, 0.5]
    assert "per_client_best_federated_round" not in complete_summary(old), "only from the metrics"


def test_a_summary_that_has_them_is_left_as_it_is() -> None:
    summary = {**_old_summary(), "best_federated_mean": 0.5, "best_federated_round": 4}
    summary["by_convention"] = {n: {**v, "best_federated_mean": 0.5, "best_federated_round": 4}
                                for n, v in summary["by_convention"].items()}  # fmt: skip
    summary["per_client_best_federated_round"] = [0.4, 0.6]
    assert complete_summary(summary, []) == summary


def test_the_run_line_names_the_best_federated_round_beside_the_best_round() -> None:
    summary = {**complete_summary(_old_summary()), "cuts": [1, 2], "wall_seconds": 12.0}
    line = result_line(summary, Path("runs/x"))
    assert "best 0.8000 (round 1), best federated 0.7500 (round 4);" in line
    assert "after local training: final 0.7800, best 0.8300, best federated 0.8100;" in line
    ended_in_warmup = {**summary, "best_federated_mean": None, "best_federated_round": None}
    assert "best 0.8000 (round 1), best federated -;" in result_line(ended_in_warmup, Path("runs/x"))
