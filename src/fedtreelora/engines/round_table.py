"""The per-round table on the console: a header once, then one aligned row per round.

Each row is printed as it happens (above the progress bars), so the table also reads well in a log
file or a Flower ``--stream`` where nothing can be redrawn. Columns have fixed widths for that reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.table import Table
from rich.text import Text

#: (header, width, justify)
COLUMNS: tuple[tuple[str, int, str], ...] = (
    ("round", 5, "right"),
    ("phase", 9, "left"),
    ("mean", 6, "right"),  # headed by the metric's short name: the clients' mean
    ("min-max", 11, "right"),
    ("loss", 6, "right"),
    ("n", 7, "right"),
    ("MB up", 5, "right"),
    ("down", 5, "right"),
    ("s", 5, "right"),
)


class RoundTable:
    """Renders round records (see ``SimulationEngine._round``) as rows of one table.

    Args:
        total_rounds: rounds in the run (for the ``r/N`` column).
        num_clients: clients in the federation (for the ``k/N`` column).
        metric: the clients' metric (``accuracy``, ``rouge1``), named in the header.
    """

    def __init__(self, total_rounds: int, num_clients: int, metric: str = "accuracy") -> None:
        self.total_rounds = total_rounds
        self.num_clients = num_clients
        self.metric = metric
        self.best: float | None = None
        self.header_shown = False

    def _table(self) -> Table:
        # One space between columns keeps the fixed part within 70 characters (logs are 80 wide).
        table = Table(box=None, show_header=not self.header_shown, header_style="bold", pad_edge=False, padding=(0, 1, 0, 0))
        for name, width, justify in COLUMNS:
            header = {"accuracy": "acc"}.get(self.metric, self.metric)[:width] if name == "mean" else name
            table.add_column(header, width=width, justify=justify, no_wrap=True)  # type: ignore[arg-type]
        table.add_column("notes", no_wrap=False)
        return table

    def row(self, record: dict[str, Any], client_values: Sequence[float], seconds: float) -> Table:
        """A one-row table for ``record``; the first call also carries the header.

        ``client_values`` are this round's per-client metric values (participants whose update was
        accepted); ``seconds`` is the round's wall time.
        """
        table = self._table()
        self.header_shown = True
        mean = record.get("mean_metric", record.get("mean_accuracy"))
        if mean is None:
            mean_cell = Text("-", style="yellow")
        else:
            improved = self.best is None or mean > self.best
            self.best = mean if improved else self.best
            mean_cell = Text(f"{mean:.4f}", style="bold green" if improved else "")
        spread = f"{min(client_values):.3f}-{max(client_values):.3f}" if client_values else "-"
        loss = record.get("mean_train_loss")
        notes = []
        server = record.get("server") or {}
        if "cuts" in server:
            notes.append("cuts " + ",".join(str(c) for c in server["cuts"]))
        if record.get("rejected"):
            notes.append(f"rejected {record['rejected']}")
        if mean is None:
            notes.append("no client update was accepted")
        table.add_row(
            f"{record['round'] + 1}/{self.total_rounds}",
            record["phase"],
            mean_cell,
            spread,
            "-" if loss is None else f"{loss:.3f}",
            f"{len(record.get('clients', []))}/{self.num_clients}",
            f"{record.get('uplink_mb_per_client', 0.0):.2f}",
            f"{record.get('downlink_mb_per_client', 0.0):.2f}",
            f"{seconds:.0f}" if seconds >= 100 else f"{seconds:.1f}",
            Text(", ".join(notes), style="yellow" if record.get("rejected") or mean is None else "cyan"),
        )
        return table
