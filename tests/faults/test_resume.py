"""A run killed with SIGKILL mid-round and resumed ends exactly like an uninterrupted run (CPU, bitwise)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

ARGS = [
    "--set", "data.groups=null",  # not the quickstart's groups: one dataset, 4 clients
    "--set", "model.num_layers=2",
    "--set", "data.num_clients=4",
    "--set", "data.n_train=48",
    "--set", "data.n_val=32",
    "--set", "federation.rounds=5",
    "--set", "fedtreelora.warmup_rounds=2",
    "--set", "fedtreelora.tau=-1",
    "--quiet",
]  # fmt: skip


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedtreelora.cli", "run", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _kill_inside_round(out: Path, round_index: int, timeout: float = 240.0) -> None:
    """Start a run and SIGKILL it while it trains round ``round_index`` (0-based), i.e. right after
    the checkpoint that ends round ``round_index - 1`` appears."""
    proc = subprocess.Popen(
        _cli("--out", str(out), *ARGS), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    pointer = out / "checkpoints" / "latest.json"
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if pointer.exists():
                try:
                    done = json.loads(pointer.read_text())["round"]
                except (json.JSONDecodeError, KeyError):
                    done = -1
                if done == round_index:
                    break
            if proc.poll() is not None:
                pytest.fail(f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.005)
        else:
            pytest.fail("run never reached the round to kill")
        assert proc.poll() is None, "the run must still be inside a round when killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists()


def _result(out: Path) -> tuple[list[dict], dict, list[dict]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    states = [load_file(str(p)) for p in sorted((out / "clients").glob("client_*.safetensors"))]
    received = [load_file(str(p)) for p in sorted((out / "clients" / "received").glob("client_*.safetensors"))]
    assert len(received) == len(states) == 4, "every client's trained and received model"
    return rows, summary, states + received


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], dict, list[dict]]:
    out = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run(_cli("--out", str(out), *ARGS), env=_env(), check=True, capture_output=True)
    return _result(out)


@pytest.mark.slow
@pytest.mark.parametrize("kill_round", [1, 3], ids=["in-warmup-round", "in-federated-round"])
def test_killed_run_resumes_to_identical_results(tmp_path: Path, reference: tuple, kill_round: int) -> None:
    out = tmp_path / "run"
    _kill_inside_round(out, kill_round)
    subprocess.run(_cli("--resume", str(out), "--quiet"), env=_env(), check=True, capture_output=True)
    rows, summary, states = _result(out)
    ref_rows, ref_summary, ref_states = reference
    assert rows == ref_rows, "every per-client metric of every round matches bitwise"
    for key in ("per_client", "final_mean", "best_mean", "cuts", "labels", "plan"):
        assert summary[key] == ref_summary[key], key
    assert len(states) == len(ref_states)
    for state, ref in zip(states, ref_states, strict=True):
        assert state.keys() == ref.keys()
        assert all(bool((state[k] == ref[k]).all()) for k in state), "final adapters (both models) are bitwise equal"


@pytest.mark.slow
def test_a_fresh_run_in_a_used_folder_drops_the_old_checkpoint(tmp_path: Path) -> None:
    from fedtreelora.config import load_config
    from fedtreelora.engines import SimulationEngine

    tiny = ["model.num_layers=1", "data.num_clients=3", "data.n_train=16", "data.n_val=8", "method=fedit"]
    SimulationEngine(load_config(overrides=[*tiny, "federation.rounds=2"]), tmp_path, quiet=True, report=False).run()
    assert (tmp_path / "checkpoints" / "latest.json").exists()
    fresh = load_config(overrides=[*tiny, "federation.rounds=1", "federation.checkpoint_every=0", "seed=7"])
    SimulationEngine(fresh, tmp_path, quiet=True, report=False).run()
    assert not (tmp_path / "checkpoints").exists(), "an older run's checkpoint could be resumed into this one"
    assert json.loads((tmp_path / "summary.json").read_text())["rounds"] == 1


@pytest.mark.slow
def test_resumed_run_logs_each_tensorboard_step_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fedtreelora.config import load_config
    from fedtreelora.engines import SimulationEngine

    tiny = ["model.num_layers=1", "data.num_clients=2", "data.n_train=16", "data.n_val=8", "method=fedit"]
    # The checkpoint follows round 2; round 3 reaches TensorBoard and is lost in the crash, so the
    # resumed process logs it again.
    config = load_config(overrides=[*tiny, "federation.rounds=3", "federation.checkpoint_every=2"])
    assert config.logging.tensorboard

    def crash(*_: object) -> None:
        raise RuntimeError("killed after the last round")

    monkeypatch.setattr(SimulationEngine, "finish", crash)
    with pytest.raises(RuntimeError, match="killed"):
        SimulationEngine(config, tmp_path, quiet=True, report=False).run()
    monkeypatch.undo()
    assert json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["round"] == 2
    SimulationEngine(config, tmp_path, quiet=True, report=False, resume=True).run()

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "train_loss/mean" in tags
    for tag in tags:
        assert [e.step for e in events.Scalars(tag)] == [1, 2, 3], tag


@pytest.mark.slow
def test_a_resumed_run_keeps_the_received_models_of_clients_that_sat_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The received models a run saves come from its checkpoint when it resumes: a run killed after its
    last checkpoint and resumed saves the same received models and phases as an uninterrupted one, those
    of clients that sat out the last rounds included."""
    from fedtreelora.config import load_config
    from fedtreelora.engines import SimulationEngine
    from fedtreelora.runfolder import RunFolder, trained_record

    tiny = ["model.num_layers=1", "data.num_clients=4", "data.n_train=16", "data.n_val=8", "method=fedtreelora"]
    config = load_config(
        overrides=[*tiny, "federation.rounds=4", "federation.fraction_train=0.5", "fedtreelora.warmup_rounds=2"]
    )
    SimulationEngine(config, tmp_path / "reference", quiet=True, report=False).run()

    def crash(*_: object) -> None:
        raise RuntimeError("killed after the last round")

    monkeypatch.setattr(SimulationEngine, "finish", crash)
    with pytest.raises(RuntimeError, match="killed"):
        SimulationEngine(config, tmp_path / "run", quiet=True, report=False).run()
    monkeypatch.undo()
    SimulationEngine(config, tmp_path / "run", quiet=True, report=False, resume=True).run()

    reference, resumed = RunFolder(tmp_path / "reference"), RunFolder(tmp_path / "run")
    last = {r["client"]: r["round"] for r in reference.read_metrics() if trained_record(r)}
    assert min(last.values()) < 3, "a client sat out the last round"
    assert resumed.read_client_meta() == reference.read_client_meta()
    assert resumed.saved_clients("received") == reference.saved_clients("received") == [0, 1, 2, 3]
    for k in range(4):
        mine, theirs = resumed.client_state(k, "received"), reference.client_state(k, "received")
        assert mine.keys() == theirs.keys()
        assert all(mine[key].equal(theirs[key]) for key in mine), k
