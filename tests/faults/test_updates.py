"""Bad client updates are rejected at the server; the round aggregates the rest; the client keeps its state."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from fedtreelora.config import load_config
from fedtreelora.engines import SimulationEngine

TINY = [
    "method=fedit",
    "model.num_layers=2",
    "data.num_clients=3",
    "data.n_train=32",
    "data.n_val=16",
    "federation.rounds=3",
]

Tamper = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def _first_key(upload: dict[str, torch.Tensor]) -> str:
    return sorted(k for k in upload if k.endswith("lora_B"))[0]


def nan_tensor(u: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    key = _first_key(u)
    return {**u, key: torch.full_like(u[key], float("nan"))}


def wrong_shape(u: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    key = _first_key(u)
    return {**u, key: torch.zeros(3, 3)}


def missing_key(u: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in u.items() if k != _first_key(u)}


def huge_norm(u: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    key = _first_key(u)
    return {**u, key: torch.full_like(u[key], 1e3)}


class BadClientEngine(SimulationEngine):
    """Client 1's upload is corrupted in round 1 on its way to the server."""

    def __init__(self, *args, fault: Tamper, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.fault = fault
        self.seen: dict[int, dict[str, torch.Tensor]] = {}

    def tamper(self, rnd: int, client: int, upload: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.fault(upload) if (rnd, client) == (1, 1) else upload


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (nan_tensor, "NaN or Inf"),
        (wrong_shape, "has shape"),
        (missing_key, "keys differ"),
        (huge_norm, "max_update_norm"),
    ],
)
def test_bad_update_is_rejected_and_the_round_goes_on(
    fault: Tamper, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = load_config(overrides=[*TINY, "federation.max_update_norm=100"])
    engine = BadClientEngine(config, fault=fault, quiet=False)
    summary = engine.run()
    round1 = summary["history"][1]
    assert round1["rejected"] == [1] and round1["clients"] == [0, 2]
    assert summary["history"][2]["clients"] == [0, 1, 2], "the client takes part again next round"
    err = capsys.readouterr().err
    assert "client 1" in err and message in err
    assert all(v is not None for v in summary["per_client"])


@pytest.mark.slow
def test_rejected_client_keeps_its_previous_state() -> None:
    """With rounds=2, client 1's final state is what it held after round 0."""
    base = load_config(overrides=[*TINY, "federation.rounds=2"])
    one_round = SimulationEngine(load_config(overrides=[*TINY, "federation.rounds=1"]), quiet=True)
    engine = BadClientEngine(base, fault=nan_tensor, quiet=True)
    captured: dict[str, list] = {}

    original = engine.recorder.write_client_states
    engine.recorder.write_client_states = lambda states, meta, *received: (
        captured.setdefault("states", states) or original(states, meta, *received)
    )  # type: ignore[method-assign]
    engine.run()
    ref: dict[str, list] = {}
    one_round.recorder.write_client_states = lambda states, meta, *received: ref.setdefault("states", states)  # type: ignore[method-assign]
    one_round.run()
    after_round0 = ref["states"][1]
    final = captured["states"][1]
    assert all(torch.equal(final[k], after_round0[k]) for k in final)
    assert not all(torch.equal(captured["states"][0][k], ref["states"][0][k]) for k in final), "others moved on"
