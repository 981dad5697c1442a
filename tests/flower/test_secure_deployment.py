"""Secure aggregation in a real deployment on loopback (TLS, SuperNode authentication, three SuperNodes as
separate processes): a node killed right after it sent its masked vector is recovered by SecAgg+'s
reconstruction threshold, and its contribution still counts.

Every SecAgg+ stage is a train message, and the SuperNode starts one ClientApp process per message, so a
secure round in deployment takes minutes on two CPU cores: this module is left out of the default test
run (``-m secure_deployment`` runs it; about five minutes)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from flower_helpers import kill_when, loopback_deployment, metrics_by_client_round, small_experiment

from fedtreelora.engines.flower import launch
from fedtreelora.engines.flower.project import write_app
from fedtreelora.engines.flower.settings import FlowerRunSettings

pytestmark = [pytest.mark.slow, pytest.mark.secure_deployment]
CONNECTION = "secure-deployment"
ROUND_TIMEOUT = 60.0
#: SecAgg+ sends four train messages a round (setup, key shares, masked vectors, unmasking): the 7th is
#: round 2's masked vector
MASKED_VECTOR_OF_ROUND_2 = 7


def sent_train_replies(log: Path) -> int:
    """How many train replies a SuperNode's log says it sent (``Sending: train message`` followed by
    ``Sent successfully``)."""
    count, sending = 0, False
    for line in log.read_text().splitlines() if log.exists() else []:
        if "Sending: train message" in line:
            sending = True
        elif "Sent successfully" in line and sending:
            count, sending = count + 1, False
        elif "Sending:" in line:
            sending = False
    return count


def test_a_node_killed_after_its_masked_vector_is_recovered_by_the_threshold(tmp_path: Path) -> None:
    config = small_experiment("fedit", rounds=2, privacy={"secure_aggregation": True})
    out = tmp_path / "run"
    app = write_app(
        FlowerRunSettings.for_experiment(config, out_dir=out, round_timeout=ROUND_TIMEOUT), tmp_path / "app"
    )
    with loopback_deployment(tmp_path, config, CONNECTION) as deployment:
        home, logs = deployment["home"], deployment["logs"]
        exit_code: list[int] = []
        runner = threading.Thread(
            target=lambda: exit_code.append(
                launch.run_app(home, app, CONNECTION, timeout=900, log=tmp_path / "run.log")
            )
        )
        runner.start()
        # Kill node 2 (and its ClientApp processes) as soon as its masked vector of round 2 has left:
        # it never answers the unmasking, so the server must rebuild its mask from the others' shares.
        masked_vector_sent = lambda: sent_train_replies(logs[2]) >= MASKED_VECTOR_OF_ROUND_2  # noqa: E731
        if not kill_when(deployment["processes"][2], masked_vector_sent, runner, timeout=600):
            pytest.fail(f"node 2 never sent its round-2 masked vector; see {tmp_path}/run.log")
        runner.join(timeout=900)
        assert not runner.is_alive() and exit_code == [0], (exit_code, (tmp_path / "run.log").read_text()[-3000:])
    assert sent_train_replies(logs[2]) == MASKED_VECTOR_OF_ROUND_2, "node 2 died before the unmasking"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2
    # the sum of round 2 holds all three vectors: node 2's mask was rebuilt from nodes 0 and 1's shares
    assert [h["clients"] for h in summary["history"]] == [[0, 1, 2], [0, 1, 2]]
    records = metrics_by_client_round(out)
    assert (1, 2) in records and records[(1, 2)]["secure_clipped"] == 0
    assert not (out / "clients" / "client_002.safetensors").exists(), "a dead node sends no final state"
