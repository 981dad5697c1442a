"""A real deployment on loopback: a SuperLink with TLS and SuperNode authentication, three
SuperNodes each holding one site's data, as separate processes; every process is bounded in time
and stopped by the test."""

from __future__ import annotations

import json
import threading
import time

import pytest
from flower_helpers import in_process, kill_when, loopback_deployment, metrics_by_client_round, small_experiment

from fedtreelora.engines.flower import launch
from fedtreelora.engines.flower.project import write_app
from fedtreelora.engines.flower.settings import FlowerRunSettings

pytestmark = pytest.mark.slow
CONNECTION = "deployment"
ROUND_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def federation(tmp_path_factory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("deployment")
    config = small_experiment("fedtreelora", rounds=3)
    with loopback_deployment(root, config, CONNECTION, spare_keys=1) as deployment:  # key 3 is never registered
        yield {**deployment, "config": config}


def test_tls_authenticated_run_completes_and_survives_a_killed_node(federation, tmp_path):
    config, home, root = federation["config"], federation["home"], federation["root"]
    out = tmp_path / "run"
    settings = FlowerRunSettings.for_experiment(config, out_dir=out, round_timeout=ROUND_TIMEOUT)
    app = write_app(settings, tmp_path / "app")
    exit_code: list[int] = []
    runner = threading.Thread(
        target=lambda: exit_code.append(launch.run_app(home, app, CONNECTION, timeout=600, log=root / "run.log"))
    )
    runner.start()

    # Kill client 2's SuperNode (and its app processes) once round 2 is on disk.
    def round_2_done() -> bool:
        path = out / "metrics.jsonl"
        rounds = [json.loads(line)["round"] for line in path.read_text().splitlines()] if path.exists() else []
        return rounds.count(1) == 3

    if not kill_when(federation["processes"][2], round_2_done, runner, timeout=400):
        pytest.fail(f"round 2 never finished; see {root}/run.log and {root}/superlink.log")
    runner.join(timeout=600)
    assert not runner.is_alive()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 3
    assert [h["clients"] for h in summary["history"]] == [[0, 1, 2], [0, 1, 2], [0, 1]]

    # Every update that arrived equals the in-process engine's (site data = the partition's shares).
    expected_dir = tmp_path / "in-process"
    in_process(config, expected_dir)
    expected, got = metrics_by_client_round(expected_dir), metrics_by_client_round(out)
    assert set(got) == set(expected) - {(2, 2)}
    for key, record in got.items():
        assert record["accuracy"] == pytest.approx(expected[key]["accuracy"], abs=1e-6), key
    # The killed client keeps its last state: its last accuracy stands, nothing of it was collected.
    assert summary["per_client"][2] == pytest.approx(expected[(1, 2)]["accuracy"], abs=1e-6)
    assert not (out / "clients" / "client_002.safetensors").exists()
    assert (out / "clients" / "client_000.safetensors").exists()


def test_unregistered_supernode_is_refused(federation, tmp_path):
    creds, home = federation["creds"], federation["home"]
    log = tmp_path / "intruder.log"
    intruder = launch.start_supernode(
        home, federation["address"], node_config={"client-id": 0, "data": "unused"}, port=launch.free_port(),
        root_certificates=creds.ca_cert, private_key=creds.node_keys[3], log=log,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and intruder.poll() is None:
            time.sleep(0.5)
        text = log.read_text()
        assert intruder.poll() is not None, f"an unregistered SuperNode kept running:\n{text}"
        assert intruder.returncode != 0
        assert "Failed to activate SuperNode" in text and "SuperNode ID" not in text  # never given a node id
    finally:
        launch.stop(intruder)
