"""docs/adding-a-method.md, followed literally: its method file, taken from the page, imported from a
folder outside the package, checked against the strategy contract and trained on a small federation."""

from __future__ import annotations

import importlib
import json
import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import test_baselines as baselines
import torch

from fedtreelora.config import ConfigError, load_config
from fedtreelora.engines import SimulationEngine
from fedtreelora.runfolder import RunFolder
from fedtreelora.strategies import Strategy
from fedtreelora.strategies.registry import METHODS, STRATEGIES

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "adding-a-method.md"
MODULE = "fedavg_b"
METHOD = "fedavg_b"
TINY = [
    "model.num_layers=2",
    "model.max_length=32",
    "data.num_clients=3",
    "data.n_train=16",
    "data.n_val=16",
    "train.local_epochs=1",
    "train.batch_size=8",
    "federation.rounds=3",
    "logging.tensorboard=false",
]


def guide_code_blocks() -> list[str]:
    """The page's fenced ``python`` blocks, in order."""
    return re.findall(r"^```python\n(.*?)^```$", GUIDE.read_text(), flags=re.MULTILINE | re.DOTALL)


def guide_method_file() -> str:
    """The block the page tells the reader to save as ``fedavg_b.py`` (its first line names the file)."""
    [source] = [block for block in guide_code_blocks() if block.startswith(f"# {MODULE}.py\n")]
    return source


@pytest.fixture
def guide_method(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[type[Strategy]]:
    """The guide's method, imported from ``tmp_path/fedavg_b.py`` (so registered); afterwards it is
    unregistered again, so that no other test sees it."""
    methods, strategies = dict(METHODS), dict(STRATEGIES)
    folder = tmp_path / "user_code"
    folder.mkdir()
    (folder / f"{MODULE}.py").write_text(guide_method_file())
    monkeypatch.syspath_prepend(str(folder))
    try:
        importlib.import_module(MODULE)
        yield STRATEGIES[METHOD]
    finally:
        sys.modules.pop(MODULE, None)
        for registry, before in ((METHODS, methods), (STRATEGIES, strategies)):
            for name in set(registry) - set(before):
                del registry[name]


def test_the_guide_holds_the_method_file_and_a_run_of_it() -> None:
    blocks = guide_code_blocks()
    assert sum(block.startswith(f"# {MODULE}.py\n") for block in blocks) == 1
    [run] = [block for block in blocks if f"\nimport {MODULE}  #" in block]
    assert f'load_config(method="{METHOD}"' in run and "SimulationEngine(config" in run


def test_importing_the_file_registers_the_method_from_its_class(guide_method: type[Strategy]) -> None:
    info = METHODS[METHOD]
    assert (info.module, info.options, info.paper, info.table_rank) == (
        MODULE,
        guide_method.Options,
        guide_method.paper,
        35,
    )
    config = load_config(method=METHOD, overrides=["fedavg_b.weighting=examples"])
    assert config.method_options().weighting == "examples"
    with pytest.raises(ConfigError, match=r"fedavg_b.weighting: Input should be 'uniform' or 'examples'"):
        load_config(method=METHOD, overrides=["fedavg_b.weighting=median"])
    doc = (guide_method.__doc__ or "").lower()
    assert all(word in doc for word in ("shared", "local", "frozen", "wire"))


def test_averages_b_and_keeps_a_local(guide_method: type[Strategy]) -> None:
    """Server side on tiny tensors (test_baselines' federation: 4 clients, 2 layers, rank 1)."""
    server = baselines.make(METHOD)
    sent = baselines.uploads("shared", [[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 4.0, 4.0]])
    up = {k: {key: sent[k][key] for key in server.upload_keys(0, k)} for k in sent}
    assert all(key.endswith(".lora_B") for k in up for key in up[k]), "only B goes up"
    assert server.payload(0, 0) == {}, "round 0: every client already holds the same initialisation"
    server.aggregate(0, up)
    for k in range(baselines.N):
        payload = baselines.only(server.payload(1, k), baselines.B0.format("shared"), baselines.B1.format("shared"))
        assert torch.equal(payload[baselines.B0.format("shared")], baselines.full(3.0, (2, 1)))
        assert torch.equal(payload[baselines.B1.format("shared")], baselines.full(2.0, (2, 1)))
    server.aggregate(1, {k: up[k] for k in (0, 3)})  # clients 1 and 2 missed the round
    assert torch.equal(server.payload(2, 1)[baselines.B0.format("shared")], baselines.full(3.5, (2, 1)))


def test_meets_the_strategy_contract(guide_method: type[Strategy]) -> None:
    """The checks tests/test_baselines.py runs on every built-in method."""
    baselines.test_server_state_round_trips_to_identical_payloads(METHOD, {})
    baselines.test_aggregating_with_torch_on_a_device_sends_what_numpy_sends(METHOD, {})


@pytest.mark.slow
def test_the_guides_method_trains(
    guide_method: type[Strategy], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    """The page's API on a small federation (MiniLM cut to 2 layers): it trains, every client receives
    the same B from round 1 on and nothing else, and the clients' A factors stay their own."""
    payloads: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    send = guide_method.payload

    def recorded_payload(self: Strategy, rnd: int, client: int) -> dict[str, torch.Tensor]:
        payloads[rnd, client] = send(self, rnd, client)
        return payloads[rnd, client]

    monkeypatch.setattr(guide_method, "payload", recorded_payload)
    out = tmp_path / "run"
    config = load_config(method=METHOD, overrides=TINY)
    summary = SimulationEngine(config, out, quiet=True, report=False).run()

    run = RunFolder(out)
    assert run.require_summary() == summary and summary["method"] == METHOD and summary["rounds"] == 3
    assert all(math.isfinite(h["mean_accuracy"]) and math.isfinite(h["mean_train_loss"]) for h in summary["history"])
    rows = [json.loads(line) for line in run.metrics.read_text().splitlines() if line]
    factor_bytes = 4 * config.model.rank * 384 * 4  # one factor of query and value in 2 layers, float32
    assert len(rows) == 3 * 3 and all(r["uplink_bytes"] == factor_bytes for r in rows), "only B goes up"

    assert all(payloads[0, k] == {} for k in range(3))
    for rnd in (1, 2):
        first = payloads[rnd, 0]
        assert first and all(key.endswith(".lora_B") for key in first)
        for k in (1, 2):
            assert payloads[rnd, k].keys() == first.keys()
            assert all(torch.equal(payloads[rnd, k][key], first[key]) for key in first), "one average B for all"

    states = [run.client_state(k) for k in range(3)]
    a_keys = [key for key in states[0] if key.endswith(".lora_A")]
    assert a_keys
    for key in a_keys:
        assert not torch.equal(states[0][key], states[1][key]) and not torch.equal(states[1][key], states[2][key])
