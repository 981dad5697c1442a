"""What a run leaves on disk: resolved config, per-client metrics, partition and summary.

Every engine writes through this class so that outputs look the same however clients ran.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from fedtreelora.config import ExperimentConfig, dump_config


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return _jsonable(value.tolist())
    return value


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file, then rename), so a crash never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2) + "\n")
    os.replace(tmp, path)


class RunRecorder:
    """Writes ``config.yaml``, ``partition.json``, ``metrics.jsonl`` and ``summary.json`` under ``out_dir``."""

    def __init__(self, out_dir: str | Path | None) -> None:
        self.out_dir = Path(out_dir) if out_dir is not None else None
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)

    def truncate_metrics(self, next_round: int) -> None:
        """Keep only metric lines of rounds before ``next_round`` (all lines dropped for 0), so a
        resumed run does not log a round twice."""
        if self.out_dir is None:
            return
        path = self.out_dir / "metrics.jsonl"
        kept = []
        if next_round > 0 and path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["round"] < next_round]
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)

    def write_config(self, config: ExperimentConfig) -> None:
        if self.out_dir is not None:
            (self.out_dir / "config.yaml").write_text(dump_config(config))

    def write_partition(self, partition: dict[str, Any]) -> None:
        if self.out_dir is not None:
            write_json(self.out_dir / "partition.json", partition)

    def log_clients(self, records: list[dict[str, Any]]) -> None:
        """Append one JSON line per client record (a round's worth at a time)."""
        if self.out_dir is None:
            return
        with (self.out_dir / "metrics.jsonl").open("a") as f:
            for record in records:
                f.write(json.dumps(_jsonable(record)) + "\n")

    def write_client_states(self, states: list[dict[str, torch.Tensor]], meta: dict[str, Any]) -> None:
        """Every client's final adapter state as ``clients/client_NNN.safetensors`` plus ``clients/meta.json``
        (what is needed to rebuild the model around them: backbone, targets, rank, experts, mixer)."""
        if self.out_dir is None:
            return
        folder = self.out_dir / "clients"
        folder.mkdir(exist_ok=True)
        for k, state in enumerate(states):
            if not state:
                continue  # held elsewhere (a Flower node that kept its personal state)
            tmp = folder / f"client_{k:03d}.safetensors.tmp"
            save_file({key: t.contiguous() for key, t in state.items()}, str(tmp))
            os.replace(tmp, folder / f"client_{k:03d}.safetensors")
        write_json(folder / "meta.json", meta)

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.out_dir is not None:
            write_json(self.out_dir / "summary.json", summary)
