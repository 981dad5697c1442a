"""The layout of a run folder: the one place that knows its file names and formats.

A run folder (what ``fedtreelora run --out DIR`` writes) holds::

    config.yaml                      the resolved experiment config (every key, defaults included)
    partition.json                   which examples each client holds (label counts, planted groups)
    metrics.jsonl                    one JSON object per line: a client's record of one round, of its local
                                     training and the model it receives; a client whose training did not
                                     count that round (not sampled, update rejected) has a record of the
                                     received model's scores only, marked ``"trained": false``
                                     (:func:`trained_record`)
    summary.json                     headline numbers, history and sharing plan; written last, so a
                                     readable one means the run finished
    clients/client_NNN.safetensors   client NNN's final trained adapter state (NNN: its index, 3 digits): the
                                     model scored after its last local training (``accuracy``)
    clients/received/client_NNN.safetensors
                                     client NNN's final received model: that state with the shared part
                                     replaced by what the server sent it after its last round, the
                                     model scored as ``received_accuracy`` (absent in runs written
                                     before it was kept)
    clients/meta.json                what rebuilds the model around those states (backbone, sites, and
                                     the phase each model was scored in)
    checkpoints/                     the latest resumable checkpoint (see :mod:`fedtreelora.engines.checkpoint`)
    tensorboard/                     TensorBoard event files (``logging.tensorboard``)
    nodes.json                       a Flower run's node of each client
    report.html, report.md           ``fedtreelora report``, with report.md's figures in report_files/

Everything else reads and writes these through :class:`RunFolder`. JSON files are written atomically
(temporary file, then rename), so a crash never leaves half a file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import yaml

from fedtreelora.config import ExperimentConfig, dump_config, load_config

if TYPE_CHECKING:  # torch only for annotations: reading a run's numbers must not need it
    import torch


ClientModel = Literal["received", "trained"]
"""Which of a client's final models: ``trained`` (its state after its last local training) or
``received`` (that state with what the server sent it after its last round in place of the shared
part, as ``federation.evaluate: received`` scores it)."""

CLIENT_MODELS: tuple[ClientModel, ...] = ("received", "trained")
"""Every :data:`ClientModel`, the default (what ``fedtreelora export`` writes) first."""


def trained_record(record: Mapping[str, Any]) -> bool:
    """True for a ``metrics.jsonl`` record of a client whose local training counted that round (its
    training scores, upload and received scores); False for a record that only scores the model a
    client that sat the round out would receive (``"trained": false``; runs written before such records
    existed have none)."""
    return record.get("trained", True) is not False


def jsonable(value: Any) -> Any:
    """``value`` with non-finite floats as None, tuples as lists, keys as str and arrays as lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return jsonable(value.tolist())
    return value


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file, then rename), so a crash never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(jsonable(data), indent=2) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


@dataclass(frozen=True)
class RunFolder:
    """One run folder: the paths of its files, and typed readers and writers for them.

    Readers of optional files return None (or an empty list) when the file is absent; see each one.

    Attributes:
        root: the folder.
    """

    root: Path

    #: folder next to the markdown report that holds its PNG figures (also named in the report's links)
    FIGURES_DIR: ClassVar[str] = "report_files"

    def __post_init__(self) -> None:
        # A command-line argument arrives as str; the dataclass is frozen, hence object.__setattr__.
        object.__setattr__(self, "root", Path(self.root))

    # --- paths ---------------------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        """The resolved experiment config (YAML)."""
        return self.root / "config.yaml"

    @property
    def partition(self) -> Path:
        """The partition record (JSON): each client's examples and label counts."""
        return self.root / "partition.json"

    @property
    def metrics(self) -> Path:
        """The per-client round records (JSON lines)."""
        return self.root / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        """The run summary (JSON), written when the run finishes."""
        return self.root / "summary.json"

    @property
    def clients_dir(self) -> Path:
        """The folder of the clients' final adapter states (the trained ones; the received ones in
        :attr:`received_dir`)."""
        return self.root / "clients"

    @property
    def received_dir(self) -> Path:
        """The folder of the clients' final received models."""
        return self.clients_dir / "received"

    def client_models_dir(self, model: ClientModel = "trained") -> Path:
        """The folder of one kind of the clients' final models."""
        if model not in CLIENT_MODELS:
            raise ValueError(f"unknown client model {model!r}; one of {', '.join(CLIENT_MODELS)}")
        return self.received_dir if model == "received" else self.clients_dir

    @property
    def client_meta(self) -> Path:
        """What rebuilds the model around the clients' states (JSON)."""
        return self.clients_dir / "meta.json"

    def client_state_file(self, client: int, model: ClientModel = "trained") -> Path:
        """Client ``client``'s final adapter state (safetensors): the trained one, or the received one."""
        return self.client_models_dir(model) / f"client_{client:03d}.safetensors"

    @property
    def checkpoints(self) -> Path:
        """The checkpoint folder (its contents: :mod:`fedtreelora.engines.checkpoint`)."""
        return self.root / "checkpoints"

    @property
    def checkpoint_pointer(self) -> Path:
        """The file naming the latest complete checkpoint (the commit point of a checkpoint)."""
        return self.checkpoints / "latest.json"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard's event folder."""
        return self.root / "tensorboard"

    @property
    def nodes(self) -> Path:
        """A Flower run's node of each client (JSON)."""
        return self.root / "nodes.json"

    @property
    def report_html(self) -> Path:
        """The self-contained HTML report."""
        return self.root / "report.html"

    @property
    def report_md(self) -> Path:
        """The markdown report (its figures in :attr:`report_figures`)."""
        return self.root / "report.md"

    @property
    def report_figures(self) -> Path:
        """The markdown report's PNG figures."""
        return self.root / self.FIGURES_DIR

    # --- reading -------------------------------------------------------------------------------------
    def has_checkpoint(self) -> bool:
        """True when a complete checkpoint exists (so the run can resume)."""
        return self.checkpoint_pointer.is_file()

    def read_config(self) -> ExperimentConfig:
        """The run's config, validated with today's schema.

        Raises:
            ConfigError when the file is absent or not a mapping; pydantic's ValidationError (a
            ValueError) when it does not validate; yaml.YAMLError when it is not YAML.
        """
        return load_config(self.config)

    def read_config_dict(self) -> dict[str, Any]:
        """The run's config as a plain dict, unvalidated; {} when absent or empty."""
        return (yaml.safe_load(self.config.read_text()) or {}) if self.config.is_file() else {}

    def read_summary(self) -> dict[str, Any] | None:
        """The run summary; None when the run has not finished: no summary, or one that cannot be read
        as a JSON object."""
        if not self.summary.is_file():
            return None
        try:
            summary = _read_json(self.summary)
        except (OSError, json.JSONDecodeError):
            return None
        return summary if isinstance(summary, dict) else None

    def require_summary(self) -> dict[str, Any]:
        """The run summary of a finished run.

        Raises:
            FileNotFoundError when there is none (the run has not finished); json.JSONDecodeError
            when it is not JSON.
        """
        if not self.summary.is_file():
            raise FileNotFoundError(f"{str(self.root)!r} holds no {self.summary.name}; is it a finished run folder?")
        summary: dict[str, Any] = _read_json(self.summary)
        return summary

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every per-client round record, in the order written (score-only records of clients that sat a
        round out included: :func:`trained_record`); [] when absent."""
        if not self.metrics.is_file():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    def read_partition(self) -> dict[str, Any] | None:
        """The partition record; None when absent."""
        return _read_json(self.partition) if self.partition.is_file() else None

    def read_partition_text(self) -> str | None:
        """The partition record as written (to compare two runs' partitions byte for byte); None when absent."""
        return self.partition.read_text() if self.partition.is_file() else None

    def read_client_meta(self) -> dict[str, Any] | None:
        """What rebuilds the model around the clients' states; None when the run saved none."""
        return _read_json(self.client_meta) if self.client_meta.is_file() else None

    def client_state_files(self, model: ClientModel = "trained") -> list[Path]:
        """Every saved client state file of one kind, sorted by name (client order); [] when none were saved."""
        folder = self.client_models_dir(model)
        return sorted(folder.glob("client_*.safetensors")) if folder.is_dir() else []

    def saved_clients(self, model: ClientModel = "trained") -> list[int]:
        """The clients whose final state of one kind the run saved (a Flower node may keep its own), in
        file order."""
        return [int(path.name.split(".", 1)[0].removeprefix("client_")) for path in self.client_state_files(model)]

    def client_state(self, client: int, model: ClientModel = "trained") -> dict[str, torch.Tensor]:
        """Client ``client``'s final adapter state, trained or received (keys as in
        :class:`fedtreelora.adapters.AdapterBank`)."""
        from safetensors.torch import load_file  # torch only when tensors are wanted

        return load_file(str(self.client_state_file(client, model)))

    def client_arrays(self, client: int, keys: Iterable[str], model: ClientModel = "trained") -> dict[str, np.ndarray]:
        """Only the named tensors of client ``client``'s state, as numpy arrays (no torch needed)."""
        from safetensors import safe_open

        with safe_open(str(self.client_state_file(client, model)), framework="np") as f:
            return {key: np.asarray(f.get_tensor(key)) for key in keys}

    # --- writing -------------------------------------------------------------------------------------
    def write_config(self, config: ExperimentConfig) -> None:
        """Write the resolved config (every key, defaults included)."""
        self.config.write_text(dump_config(config))

    def write_partition(self, partition: Mapping[str, Any]) -> None:
        """Write the partition record."""
        write_json(self.partition, partition)

    def append_metrics(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Append one line per client record."""
        with self.metrics.open("a") as f:
            for record in records:
                f.write(json.dumps(jsonable(record)) + "\n")

    def truncate_metrics(self, next_round: int) -> None:
        """Keep only the records of rounds before ``next_round`` (none for 0), lines unchanged; creates
        an empty file when absent."""
        path = self.metrics
        kept = []
        if next_round > 0 and path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["round"] < next_round]
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)

    def write_client_state(
        self, client: int, state: Mapping[str, torch.Tensor], model: ClientModel = "trained"
    ) -> None:
        """Write client ``client``'s final adapter state (trained or received) atomically."""
        from safetensors.torch import save_file

        self.client_models_dir(model).mkdir(parents=True, exist_ok=True)
        path = self.client_state_file(client, model)
        tmp = path.with_name(path.name + ".tmp")
        save_file({key: t.contiguous() for key, t in state.items()}, str(tmp))
        os.replace(tmp, path)

    def write_client_meta(self, meta: Mapping[str, Any]) -> None:
        """Write what rebuilds the model around the clients' states."""
        self.clients_dir.mkdir(exist_ok=True)
        write_json(self.client_meta, meta)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Write the run summary (last: it marks the run as finished)."""
        write_json(self.summary, summary)

    def write_nodes(self, nodes: Mapping[int, Any]) -> None:
        """Write a Flower run's node of each client."""
        write_json(self.nodes, {str(c): n for c, n in nodes.items()})
