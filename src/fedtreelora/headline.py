"""A run's headline numbers from its round history: the final round, the best round, and the best
federated round.

The best round (``best_mean``, ``best_round``) is the highest round mean over every round, as the
methods' papers report it; it can be a warm-up round, before anything is shared. The best federated
round (``best_federated_mean``, ``best_federated_round``) is the highest round mean from the first
round whose phase is not warm-up on; for a method without warm-up every round counts.

The engine writes both into the run summary; :func:`complete_summary` computes the federated ones for
a summary written before they existed, from its history (and, for the per-client values, from the
run's per-client round records, :meth:`fedtreelora.runfolder.RunFolder.read_metrics`). Needs no torch:
the report and ``compare`` read run folders with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedtreelora.runfolder import ClientRecord, RoundRecord, RunSummary

WARMUP_PHASE = "warmup"
"""The phase name of rounds before anything is shared (local training; FedTreeLoRA, FedLEASE and the
methods' ``warmup_rounds``)."""

FEDERATED_KEYS = ("best_federated_mean", "best_federated_round")
"""The summary keys (top level, and under each ``by_convention`` entry) of the best federated round."""


def round_mean(record: Mapping[str, Any]) -> float | None:
    """A round record's mean client metric under the run's headline convention (records written before
    ``mean_metric`` existed hold ``mean_accuracy``: :attr:`fedtreelora.runfolder.RoundRecord.mean`)."""
    return RoundRecord(record).mean


def first_federated_round(history: Sequence[Mapping[str, Any]]) -> int | None:
    """The first round (0-based) whose phase is not warm-up: 0 for a method without warm-up; None when
    every round was a warm-up round, no round ran, or a round record names no phase (written by a
    version that did not record it)."""
    phases = [RoundRecord(h).phase for h in history]
    if any(p is None for p in phases):
        return None
    return next((r for r, phase in enumerate(phases) if phase != WARMUP_PHASE), None)


def best_from(means: Sequence[float | None], start: int | None) -> tuple[float | None, int | None]:
    """The highest mean among rounds ``start`` and later, and its round (the earliest on ties); (None,
    None) when ``start`` is None or no round from it has a mean."""
    if start is None:
        return None, None
    scored = [(m, r) for r, m in enumerate(means) if r >= start and m is not None]
    if not scored:
        return None, None
    best, best_round = max(scored, key=lambda pair: (pair[0], -pair[1]))
    return best, best_round


def headline(history: Sequence[Mapping[str, Any]], key: str) -> dict[str, Any]:
    """``final_mean``, ``best_mean``, ``best_round``, ``best_federated_mean`` and
    ``best_federated_round`` of the round means under ``key`` (one evaluation convention, e.g.
    ``received_mean_metric``); None where no round recorded it."""
    means = [h.get(key) for h in history]
    best, best_round = best_from(means, 0)
    federated, federated_round = best_from(means, first_federated_round(history))
    return {
        "final_mean": means[-1] if means else None,
        "best_mean": best,
        "best_round": best_round,
        "best_federated_mean": federated,
        "best_federated_round": federated_round,
    }


def best_federated(history: Sequence[Mapping[str, Any]]) -> tuple[float | None, int | None]:
    """The best federated round's mean under the run's headline convention (:func:`round_mean`) and its
    round."""
    return best_from([round_mean(h) for h in history], first_federated_round(history))


def last_seen(values: Sequence[float | None]) -> float | None:
    """The last value that is not None (a client's latest score), None when there is none."""
    return next((v for v in reversed(values) if v is not None), None)


def headline_score_key(summary: Mapping[str, Any]) -> str:
    """The per-client record key of a run's headline score: ``received_<metric>`` when it scored the
    received model, ``<metric>`` when it scored after local training (runs written before the setting
    existed: :meth:`fedtreelora.runfolder.Convention.of`)."""
    return RunSummary(summary).score_key


def per_client_scores(summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[list[float | None]]:
    """(clients, rounds) each client's headline score per round from a run's per-client round records,
    None where it has none."""
    run = RunSummary(summary)
    num_rounds, num_clients = run.num_rounds, run.num_clients
    scores: list[list[float | None]] = [[None] * num_rounds for _ in range(num_clients)]
    for row in map(ClientRecord, rows):
        r, k, value = row.round, row.client, row.score(run.metric, run.evaluate)
        if value is not None and 0 <= r < num_rounds and 0 <= k < num_clients:
            scores[k][r] = value
    return scores


def complete_summary(summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """``summary`` with the best federated round's keys computed from its history where it lacks them
    (a run written before they existed): ``best_federated_mean`` and ``best_federated_round``, the same
    under each ``by_convention`` entry, and, when ``rows`` (the run's per-client round records) are
    given, ``per_client_best_federated_round``. A value that cannot be computed (a history without
    phases, a run that ended in warm-up) is None. A summary that has them is returned as it is (copied).

    Read run folders through :meth:`fedtreelora.runfolder.RunFolder.read_complete_summary`, which calls
    this where a summary needs it."""
    run = RunSummary(summary)
    out = run.to_dict()
    history = run.history
    if any(key not in run for key in FEDERATED_KEYS):
        out["best_federated_mean"], out["best_federated_round"] = best_federated(history)
    headlines = run.headlines
    if headlines is not None:
        # An entry without a best federated round is computed again (the same value where the engine
        # wrote None: the same history, the same rule).
        out["by_convention"] = {
            convention.value: {
                **values.to_dict(),
                **(
                    {}
                    if values.best_federated_round is not None
                    else {k: headline(history, convention.mean_key)[k] for k in FEDERATED_KEYS}
                ),
            }
            for convention, values in headlines.items()
        }
    if rows is not None and "per_client_best_federated_round" not in out:
        best = RunSummary(out).best_federated_round
        scores = per_client_scores(out, rows)
        out["per_client_best_federated_round"] = [
            None if best is None else last_seen(values[: best + 1]) for values in scores
        ]
    return out
