"""The per-round console table: header once, fixed columns, notes that never wrap, best mean marked."""

from __future__ import annotations

from fedtreelora.engines.round_table import COLUMNS, RoundTable


def _record(rnd: int, mean: float | None, **extra) -> dict:  # type: ignore[no-untyped-def]
    return {
        "round": rnd, "phase": "warmup" if rnd == 0 else "federated", "clients": [0, 2] if mean is not None else [],
        "mean_metric": mean, "trained_mean_metric": None if mean is None else mean + 0.1,
        "mean_train_loss": 0.5 if mean is not None else None,
        "uplink_mb_per_client": 0.29, "downlink_mb_per_client": 0.59, **extra,
    }  # fmt: skip


def test_rows_line_up_under_one_header_and_notes_run_on() -> None:
    table = RoundTable(total_rounds=12, num_clients=10, metric="rouge1")
    first = table.row(_record(0, 0.81, server={"cuts": [1, 1, 1, 2, 2, 2, 3, 3, 4, 4, 5, 6]}), [0.7, 0.9], 18.7)
    second = table.row(_record(1, 0.79, rejected=[3]), [0.75, 0.83], 123.4)
    third = table.row(_record(2, None), [], 2.0)
    header, row1 = first.plain.split("\n")
    assert header.split()[:5] == ["round", "phase", "rouge1", "trained", "min-max"] and "\n" not in second.plain
    fixed = sum(width + 1 for _, width, _ in COLUMNS)
    # the notes column starts at the same offset on every line, whatever its length
    assert row1[fixed:] == "cuts 1,1,1,2,2,2,3,3,4,4,5,6"
    assert second.plain[fixed:] == "rejected [3]" and third.plain[fixed:] == "no client update was accepted"
    assert header[fixed:] == "notes"
    assert row1[:fixed].split() == [
        "1/12", "warmup", "0.8100", "0.9100", "0.700-0.900", "0.500", "2/10", "0.29", "0.59", "18.7"
    ]  # fmt: skip
    assert second.plain.split()[2] == "0.7900" and second.plain.split()[9] == "123"
    assert third.plain.split()[2:5] == ["-", "-", "-"] and third.plain.split()[6] == "0/10"
    # the best mean so far is highlighted: round 1 yes, round 2 (lower) no
    assert any("green" in str(span.style) for span in first.spans)
    assert not any("green" in str(span.style) for span in second.spans)
