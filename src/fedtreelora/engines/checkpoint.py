"""Whole-run checkpoints: written atomically, resumed exactly.

Layout under the run folder::

    checkpoints/round_0004/clients.safetensors   every client's adapter state ("{client}/{key}")
    checkpoints/round_0004/server.safetensors    the strategy's server tensors
    checkpoints/round_0004/received.safetensors  per client, the payload its received model was last scored with
    checkpoints/round_0004/state.json            next round, history, per-client metrics, server metadata
    checkpoints/latest.json                      {"round": 4, "path": "round_0004"}  (the commit point)

A checkpoint folder is complete before ``latest.json`` is atomically replaced to point at it, so a
crash at any moment leaves the previous checkpoint intact. Nothing else is needed for an exact
resume: every client's round draws its batches and dropout from ``(seed, round, client)``, and
optimizers start fresh each round.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedtreelora.errors import ConfigError
from fedtreelora.runfolder import RunFolder, write_json
from fedtreelora.strategies import Strategy

FORMAT_VERSION = 1


@dataclass
class RunState:
    """Where a run stands between rounds.

    Attributes:
        next_round: the first round still to run.
        client_states: per client, its adapter state (CPU float32 tensors).
        history: per finished round, the round record (means, communication, server info).
        per_client: per client, its accuracy in every finished round (None where it did not take part).
        wall_seconds: time spent in earlier processes of this run.
        received_payloads: client -> the server payload its received model was last scored with; the
            received model is its state in ``client_states`` with these tensors in place (a client's
            state changes only in the rounds it is scored in, so the two stay in step).
        received_rounds: client -> the round whose phase that received model was scored in (the round
            after the last one it took part in).
    """

    next_round: int
    client_states: list[dict[str, torch.Tensor]]
    history: list[dict[str, Any]] = field(default_factory=list)
    per_client: list[list[float | None]] = field(default_factory=list)
    wall_seconds: float = 0.0
    received_payloads: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    received_rounds: dict[int, int] = field(default_factory=dict)

    def received_states(self) -> dict[int, dict[str, torch.Tensor]]:
        """client -> its received model (kept state plus payload), for the clients that have one and
        whose state this process holds."""
        return {
            k: {**self.client_states[k], **payload}
            for k, payload in sorted(self.received_payloads.items())
            if self.client_states[k]
        }


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write ``tensors`` to one safetensors file; a tensor whose storage an earlier key already holds
    (clients that have not trained yet all hold the one initial state) is written as its own copy,
    since a safetensors file cannot share memory between keys."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        t = value.detach().to("cpu").contiguous()
        storage = t.untyped_storage().data_ptr()
        out[key] = t.clone() if storage in seen else t
        seen.add(storage)
    save_file(out, str(path))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: str | Path, state: RunState, strategy: Strategy) -> Path:
    """Write a complete checkpoint of ``state`` and the strategy's server state; return its folder."""
    run = RunFolder(Path(run_dir))
    root = run.checkpoints
    root.mkdir(parents=True, exist_ok=True)
    name = f"round_{state.next_round:04d}"
    folder = root / name
    staging = root / f".{name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    clients = {f"{k}/{key}": t for k, s in enumerate(state.client_states) for key, t in s.items()}
    _save_tensors(clients, staging / "clients.safetensors")
    server_tensors, server_meta = strategy.state_dict()
    _save_tensors(server_tensors, staging / "server.safetensors")
    received = {f"{k}/{key}": t for k, payload in state.received_payloads.items() for key, t in payload.items()}
    _save_tensors(received, staging / "received.safetensors")
    write_json(
        staging / "state.json",
        {
            "format": FORMAT_VERSION,
            "next_round": state.next_round,
            "num_clients": len(state.client_states),
            "history": state.history,
            "per_client": state.per_client,
            "wall_seconds": state.wall_seconds,
            "received_rounds": {str(k): r for k, r in state.received_rounds.items()},
            "server": server_meta,
        },
    )
    for f in staging.iterdir():
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)
    _fsync_dir(root)
    write_json(run.checkpoint_pointer, {"round": state.next_round, "path": name})  # the commit point
    _fsync_dir(root)
    for old in root.iterdir():
        if old.is_dir() and old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def load_checkpoint(run_dir: str | Path, strategy: Strategy) -> RunState | None:
    """The latest complete checkpoint, with the strategy's server state restored; None if there is none."""
    run = RunFolder(Path(run_dir))
    root, pointer = run.checkpoints, run.checkpoint_pointer
    if not pointer.is_file():
        return None
    folder = root / json.loads(pointer.read_text())["path"]
    meta = json.loads((folder / "state.json").read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ConfigError(f"checkpoint {folder} has format {meta.get('format')}, this version reads {FORMAT_VERSION}")
    flat = load_file(str(folder / "clients.safetensors"))
    client_states: list[dict[str, torch.Tensor]] = [{} for _ in range(meta["num_clients"])]
    for flat_key, tensor in flat.items():
        client, key = flat_key.split("/", 1)
        client_states[int(client)][key] = tensor
    strategy.load_state_dict(load_file(str(folder / "server.safetensors")), meta["server"])
    # A checkpoint written before received models were kept has neither: its clients get one again
    # from the next round they take part in.
    received_rounds = {int(k): int(r) for k, r in (meta.get("received_rounds") or {}).items()}
    received_payloads: dict[int, dict[str, torch.Tensor]] = {k: {} for k in received_rounds}
    if (folder / "received.safetensors").is_file():
        for flat_key, tensor in load_file(str(folder / "received.safetensors")).items():
            client, key = flat_key.split("/", 1)
            received_payloads.setdefault(int(client), {})[key] = tensor
    return RunState(
        next_round=int(meta["next_round"]),
        client_states=client_states,
        history=meta["history"],
        per_client=meta["per_client"],
        wall_seconds=float(meta["wall_seconds"]),
        received_payloads=received_payloads,
        received_rounds=received_rounds,
    )
