"""The per-round table on the console: a header once, then one aligned row per round.

Each row is printed as it happens (above the progress bars), so the table also reads well in a log
file or a Flower ``--stream`` where nothing can be redrawn: columns have fixed widths, and the last
column (cuts, rejections) runs on instead of wrapping.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.text import Text

from fedtreelora.runfolder import Convention, RoundRecord

#: (header, width, align) of the fixed columns; "mean" is headed by the metric's short name, "other" by
#: the evaluation convention that is not the headline ("trained" beside the received model's score).
COLUMNS: tuple[tuple[str, int, str], ...] = (
    ("round", 5, ">"),
    ("phase", 9, "<"),
    ("mean", 6, ">"),
    ("other", 7, ">"),
    ("min-max", 11, ">"),
    ("loss", 6, ">"),
    ("n", 7, ">"),
    ("MB up", 5, ">"),
    ("down", 5, ">"),
    ("s", 5, ">"),
)


class RoundTable:
    """Renders round records (see ``SimulationEngine._round``) as rows of one table.

    Args:
        total_rounds: rounds in the run (for the ``r/N`` column).
        num_clients: clients in the federation (for the ``k/N`` column).
        metric: the clients' metric (``accuracy``, ``rouge1``), heading the mean column.
        evaluate: the headline convention (``federation.evaluate``); the other one gets its own column.
    """

    def __init__(
        self, total_rounds: int, num_clients: int, metric: str = "accuracy", evaluate: str = "received"
    ) -> None:
        self.total_rounds = total_rounds
        self.num_clients = num_clients
        self.metric = metric
        self.other = Convention(evaluate).other
        self.best: float | None = None
        self.header_shown = False

    def header(self) -> Text:
        short = {"accuracy": "acc"}.get(self.metric, self.metric)
        names = [short if n == "mean" else ("recvd" if self.other is Convention.RECEIVED else self.other.value) if n == "other" else n
                 for n, _, _ in COLUMNS]  # fmt: skip
        cells = [f"{name[:width]:{align}{width}}" for name, (_, width, align) in zip(names, COLUMNS, strict=True)]
        return Text(" ".join([*cells, "notes"]), style="bold")

    def row(self, record: dict[str, Any], client_values: Sequence[float], seconds: float) -> Text:
        """The row of ``record``, preceded by the header on the first call.

        ``client_values`` are this round's per-client metric values under the headline convention
        (received: every client, sampled or not; trained: the clients whose update was accepted);
        ``seconds`` is the round's wall time. The "other" column is the round's mean under the
        convention that is not the headline; the ``n`` column counts the clients whose update counted.
        """
        round_record = RoundRecord(record)
        other = round_record.convention_mean(self.other)
        mean = round_record.mean
        improved = mean is not None and (self.best is None or mean > self.best)
        if improved:
            self.best = mean
        loss = round_record.mean_train_loss
        values = [
            f"{round_record.round + 1}/{self.total_rounds}",
            str(round_record.phase),
            "-" if mean is None else f"{mean:.4f}",
            "-" if other is None else f"{other:.4f}",
            f"{min(client_values):.3f}-{max(client_values):.3f}" if client_values else "-",
            "-" if loss is None else f"{loss:.3f}",
            f"{len(round_record.clients)}/{self.num_clients}",
            f"{round_record.uplink_mb:.2f}",
            f"{round_record.downlink_mb:.2f}",
            f"{seconds:.0f}" if seconds >= 100 else f"{seconds:.1f}",
        ]
        notes = []
        server = round_record.server
        if "cuts" in server:
            notes.append("cuts " + ",".join(str(c) for c in server["cuts"]))
        if round_record.has_privacy:  # privacy on: epsilon at the configured delta (server's view beside it)
            eps, server_eps = round_record.epsilon, round_record.epsilon_server
            text_eps = "inf" if eps is None else f"{eps:.2f}"
            if server_eps != eps:
                text_eps += "/" + ("inf" if server_eps is None else f"{server_eps:.2f}") + " server"
            notes.append(f"eps {text_eps}")
        if round_record.rejected:
            notes.append(f"rejected {round_record.rejected}")
        if mean is None:
            notes.append("no client update was accepted")
        text = Text()
        if not self.header_shown:
            text.append_text(self.header())
            text.append("\n")
            self.header_shown = True
        for i, (value, (_, width, align)) in enumerate(zip(values, COLUMNS, strict=True)):
            style = "bold green" if i == 2 and improved else ("yellow" if i == 2 and mean is None else "")
            text.append(f"{value:{align}{width}}" + " ", style=style)
        text.append(", ".join(notes), style="yellow" if round_record.rejected or mean is None else "cyan")
        return text
