"""Shared pieces of the Flower tests: a small experiment and a run of it in the in-process engine."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fedtreelora.config import ExperimentConfig, experiment_config_model  # noqa: E402
from fedtreelora.engines import SimulationEngine  # noqa: E402


def small_experiment(method: str, *, rounds: int = 3, num_clients: int = 3, **sections: Any) -> ExperimentConfig:
    """MiniLM cut to 2 layers, a few clients with 16 examples each."""
    data: dict[str, Any] = {
        "method": method,
        "model": {"num_layers": 2, "max_length": 32},
        "data": {"num_clients": num_clients, "n_train": 16, "n_val": 16},
        "federation": {"rounds": rounds},
        "train": {"local_epochs": 1, "batch_size": 8},
        "logging": {"tensorboard": False},
    }
    if method == "fedtreelora":
        data["fedtreelora"] = {"warmup_rounds": 1}
    data.update(sections)
    return experiment_config_model().model_validate(data)


def metrics_by_client_round(run_dir: Path) -> dict[tuple[int, int], dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {(r["round"], r["client"]): r for r in map(json.loads, lines) if r}


def in_process(config: ExperimentConfig, out: Path) -> dict[str, Any]:
    return SimulationEngine(config, out, quiet=True, report=False).run()


@contextlib.contextmanager
def loopback_deployment(
    root: Path, config: ExperimentConfig, connection: str, *, nodes: int = 3, spare_keys: int = 0
) -> Iterator[dict[str, Any]]:
    """A SuperLink with TLS and SuperNode authentication and ``nodes`` registered SuperNodes (node k holds
    client k's site), each a separate process logging to ``root/supernode{k}.log``; ``spare_keys`` more
    node keys are made and never registered. Yields ``root``, ``creds``, ``home``, ``address``,
    ``processes`` (``"superlink"`` and each node's index) and ``logs``; stops every process on exit."""
    from fedtreelora.engines.flower import launch
    from fedtreelora.engines.flower.certs import make_credentials
    from fedtreelora.engines.flower.sites import write_sites

    creds = make_credentials(root / "certs", num_nodes=nodes + spare_keys)
    sites = write_sites(config, root / "sites")
    home, port = root / "home", launch.free_port()
    address = f"127.0.0.1:{port}"
    launch.write_connection(home, connection, address, creds.ca_cert)
    logs = {k: root / f"supernode{k}.log" for k in range(nodes)}
    processes: dict[Any, Any] = {}
    try:
        processes["superlink"] = launch.start_superlink(
            home, port, credentials=creds, authenticate=True, log=root / "superlink.log"
        )
        for k in range(nodes):
            launch.register_supernode(home, connection, creds.node_public_key(k))
        for k in range(nodes):
            processes[k] = launch.start_supernode(
                home, address, node_config={"client-id": k, "data": str(sites[k])}, port=launch.free_port(),
                root_certificates=creds.ca_cert, private_key=creds.node_keys[k], log=logs[k],
            )  # fmt: skip
        yield {"root": root, "creds": creds, "home": home, "address": address, "processes": processes, "logs": logs}
    finally:
        for process in processes.values():
            launch.stop(process)


def kill_when(process: Any, ready: Callable[[], bool], runner: threading.Thread, timeout: float) -> bool:
    """Poll ``ready`` while ``runner`` (the thread running the app) lives; when it holds, SIGKILL
    ``process``'s group (a SuperNode and its ClientApp processes) and return True. False: the run ended
    or ``timeout`` seconds passed first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and runner.is_alive():
        if ready():
            os.killpg(process.pid, signal.SIGKILL)
            return True
        time.sleep(0.2)
    return False
