"""What a run leaves on disk: resolved config, per-client metrics, partition and summary.

Every engine writes through this class so that outputs look the same however clients ran; the file
names and formats are :class:`fedtreelora.runfolder.RunFolder`'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fedtreelora.config import ExperimentConfig
from fedtreelora.runfolder import RunFolder


class RunRecorder:
    """Writes a run's config, partition, per-client metrics, client states and summary into ``out_dir``
    (nothing when ``out_dir`` is None).

    Attributes:
        out_dir: the run folder, or None for a run that keeps nothing.
        folder: the same as a :class:`RunFolder`, or None.
    """

    def __init__(self, out_dir: str | Path | None) -> None:
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.folder = RunFolder(self.out_dir) if self.out_dir is not None else None
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)

    def truncate_metrics(self, next_round: int) -> None:
        """Keep only metric lines of rounds before ``next_round`` (all lines dropped for 0), so a
        resumed run does not log a round twice."""
        if self.folder is not None:
            self.folder.truncate_metrics(next_round)

    def write_config(self, config: ExperimentConfig) -> None:
        """The resolved config."""
        if self.folder is not None:
            self.folder.write_config(config)

    def write_partition(self, partition: dict[str, Any]) -> None:
        """The partition record (each client's examples)."""
        if self.folder is not None:
            self.folder.write_partition(partition)

    def log_clients(self, records: list[dict[str, Any]]) -> None:
        """Append one JSON line per client record (a round's worth at a time)."""
        if self.folder is not None:
            self.folder.append_metrics(records)

    def write_client_states(
        self,
        states: list[dict[str, torch.Tensor]],
        meta: dict[str, Any],
        received: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
    ) -> None:
        """Every client's final adapter state, plus what is needed to rebuild the model around them
        (backbone, targets, rank, experts, and the phase each model was scored in).

        Args:
            states: per client, its state after its last local training (empty: held elsewhere).
            meta: the model description (:attr:`~fedtreelora.runfolder.RunFolder.client_meta`).
            received: client -> its final received model (the state with the server's payload in
                place of the shared part), for the clients that have one.
        """
        if self.folder is None:
            return
        self.folder.clients_dir.mkdir(exist_ok=True)
        for k, state in enumerate(states):
            if not state:
                continue  # held elsewhere (a Flower node that kept its personal state)
            self.folder.write_client_state(k, state)
        for k, model in sorted((received or {}).items()):
            self.folder.write_client_state(k, model, "received")
        written = {self.folder.client_state_file(k, "received") for k in received or {}}
        for path in self.folder.client_state_files("received"):
            if path not in written:  # an earlier run's, in a reused folder
                path.unlink()
        self.folder.write_client_meta(meta)

    def write_summary(self, summary: dict[str, Any]) -> None:
        """The run summary (written last: it marks the run as finished)."""
        if self.folder is not None:
            self.folder.write_summary(summary)
