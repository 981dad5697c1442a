"""Partial participation: sampled clients per round, and FedTreeLoRA clients that missed warm-up."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedtreelora.adapters import Site
from fedtreelora.config import load_config
from fedtreelora.engines import SimulationEngine
from fedtreelora.runfolder import RunFolder, trained_record
from fedtreelora.strategies import FederationContext, get_strategy

N, LAYERS = 5, 3
SITES = tuple(Site(f"enc.{layer}.q", layer, "q", 3, 2) for layer in range(LAYERS))


def _context() -> FederationContext:
    shapes = {
        f"{s.name}.{e}.lora_{f}": ((1, 3) if f == "A" else (2, 1))
        for s in SITES
        for e in ("cluster", "external")
        for f in "AB"
    }
    return FederationContext(N, SITES, LAYERS, ("q",), 10, (10,) * N, 0, 1, shapes)


def _upload(b: list[float]) -> dict[str, torch.Tensor]:
    """A client's upload with B = b[layer] (times a fixed vector) at every layer, A = 1."""
    out = {}
    for s in SITES:
        out[f"{s.name}.cluster.lora_A"] = torch.ones(1, 3)
        out[f"{s.name}.cluster.lora_B"] = torch.tensor([[b[s.layer]], [b[s.layer] / 2]])
    return out


# two groups that separate more with depth: {0, 1, 2} near 0, {3, 4} near 5
PROFILES = {0: [0.0, 0.0, 0.0], 1: [0.1, 0.2, 0.1], 2: [0.05, 0.1, 0.2], 3: [0.2, 5.0, 5.0], 4: [0.1, 5.1, 5.2]}


def test_client_missing_warmup_is_placed_by_its_first_upload() -> None:
    cls = get_strategy("fedtreelora")
    strategy = cls(cls.Options(warmup_rounds=1, tau=0.2, window=3), _context())
    info = strategy.aggregate(0, {c: _upload(PROFILES[c]) for c in (0, 1, 2, 3)})  # client 4 missed warm-up
    assert info["cuts"] == strategy.plan.cuts.tolist()
    assert (strategy.plan.labels[:, 4] == -1).all(), "not placed before its first upload"
    assert strategy.payload(1, 4) == {}, "nothing to receive before it is placed"
    assert strategy.payload(1, 0), "the others receive their experts"
    info = strategy.aggregate(1, {4: _upload(PROFILES[4]), 0: _upload(PROFILES[0])})
    assert info["placed"] == [4]
    labels = strategy.plan.labels
    assert (labels[:, 4] == labels[:, 3]).all(), "joins the clients its B resembles"
    for layer in range(1, LAYERS):  # nesting survives the placement
        for g in np.unique(labels[layer]):
            assert len(set(labels[layer - 1][labels[layer] == g].tolist())) == 1
    assert strategy.payload(2, 4), "and receives experts from then on"


def test_a_client_without_fresh_uploads_still_gets_its_cluster_experts() -> None:
    cls = get_strategy("fedtreelora")
    strategy = cls(cls.Options(warmup_rounds=1, tau=-1.0, window=2), _context())
    strategy.aggregate(0, {c: _upload(PROFILES[c]) for c in range(N)})
    strategy.aggregate(1, {c: _upload(PROFILES[c]) for c in (0, 1, 3)})  # 2 and 4 sat out
    labels = strategy.plan.labels
    deep = LAYERS - 1
    assert labels[deep, 2] == labels[deep, 0] != labels[deep, 3]
    key = "enc.2.q.cluster.lora_B"
    expected = (torch.tensor(PROFILES[0][deep]) + PROFILES[1][deep]) / 2
    assert torch.allclose(strategy.payload(2, 2)[key][0, 0], expected)


def test_a_client_whose_outside_all_sat_out_keeps_its_external_expert() -> None:
    cls = get_strategy("fedtreelora")
    strategy = cls(cls.Options(warmup_rounds=1, tau=-1.0, window=2), _context())
    strategy.aggregate(0, {c: _upload(PROFILES[c]) for c in range(N)})
    labels = strategy.plan.labels
    deep = LAYERS - 1
    assert labels[deep, 0] != labels[deep, 3] == labels[deep, 4], "two groups at the deepest layer"
    key = "enc.2.q.external.lora_B"
    before = strategy.payload(1, 0)[key].clone()
    assert before.abs().sum() > 0, "an external expert from the other group"
    strategy.aggregate(1, {c: _upload(PROFILES[c]) for c in (0, 1, 2)})  # the other group (3, 4) sat out
    assert torch.equal(strategy.payload(2, 0)[key], before), "the last external expert is kept, not zeroed"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fedtreelora", "fedit", "fedlease"])
def test_partial_participation_runs_and_keeps_absent_clients(method: str) -> None:
    config = load_config(
        overrides=[
            f"method={method}",
            "model.num_layers=2",
            "data.num_clients=6",
            "data.n_train=32",
            "data.n_val=16",
            "federation.rounds=4",
            "federation.fraction_train=0.5",
            "fedtreelora.warmup_rounds=2",
            "fedlease.warmup_rounds=2",
        ]
    )
    summary = SimulationEngine(config, quiet=True).run()
    per_round = [h["clients"] for h in summary["history"]]
    assert all(len(c) == 3 for c in per_round), "half the clients each round"
    assert len({tuple(c) for c in per_round}) > 1, "the sample changes from round to round"
    again = SimulationEngine(config, quiet=True).run()
    assert [h["clients"] for h in again["history"]] == per_round, "and is fixed by the seed"
    if method == "fedtreelora":
        labels = np.asarray(summary["labels"])
        assert labels.shape == (2, 6)


@pytest.mark.slow
def test_a_checkpoint_holds_clients_that_have_not_trained_yet(tmp_path: Path) -> None:
    """Clients not sampled yet all hold the one initial state (the same tensors); the checkpoint after
    round 1 still writes, and a resumed run reads them back."""
    tiny = ["model.num_layers=1", "data.num_clients=4", "data.n_train=16", "data.n_val=8", "method=fedit"]
    config = load_config(overrides=[*tiny, "federation.rounds=2", "federation.fraction_train=0.5"])
    summary = SimulationEngine(config, tmp_path, quiet=True, report=False).run()
    assert len(summary["history"][0]["clients"]) == 2, "two clients had not trained when round 1 ended"
    assert json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["round"] == 2
    resumed = SimulationEngine(config, tmp_path, quiet=True, report=False, resume=True).run()
    assert resumed["per_client"] == summary["per_client"]


#: a tiny federation where half the clients train each round
PARTIAL = [
    "model.num_layers=1",
    "data.num_clients=4",
    "data.n_train=16",
    "data.n_val=8",
    "train.batch_size=8",
    "federation.rounds=3",
    "federation.fraction_train=0.5",
    "logging.tensorboard=false",
]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fedit", "local"])
def test_every_client_is_scored_every_round_on_what_it_would_receive(tmp_path: Path, method: str) -> None:
    """Under partial participation the received model of every client is scored after every round, sampled
    or not, so a round's mean is over the whole federation; the clients that sat the round out have a
    record of those scores only. Trained scores, losses and bytes stay the participants'."""
    config = load_config(overrides=[*PARTIAL, f"method={method}"])
    summary = SimulationEngine(config, tmp_path, quiet=True, report=False).run()
    rows = RunFolder(tmp_path).read_metrics()
    assert sorted((r["round"], r["client"]) for r in rows) == [(r, k) for r in range(3) for k in range(4)]
    for h in summary["history"]:
        mine = {r["client"]: r for r in rows if r["round"] == h["round"]}
        trained = sorted(k for k, r in mine.items() if trained_record(r))
        assert trained == h["clients"] and len(trained) == 2
        for k, r in mine.items():
            if k in trained:
                assert "trained" not in r and {"accuracy", "train_loss", "uplink_bytes"} <= set(r)
            else:
                assert r["trained"] is False
                assert set(r) == {"round", "client", "phase", "trained", "received_accuracy", "received_eval_loss"}
        assert h["mean_metric"] == pytest.approx(np.mean([r["received_accuracy"] for r in mine.values()]))
        assert h["mean_metric"] == h["received_mean_metric"]
        assert h["trained_mean_metric"] == pytest.approx(np.mean([mine[k]["accuracy"] for k in trained]))
        assert h["mean_train_loss"] == pytest.approx(np.mean([mine[k]["train_loss"] for k in trained]))
        assert h["uplink_mb_per_client"] == pytest.approx(np.mean([mine[k]["uplink_bytes"] for k in trained]) / 1e6)
    last = {r["client"]: r["received_accuracy"] for r in rows if r["round"] == 2}
    assert summary["per_client"] == [last[k] for k in range(4)]
    assert summary["final_mean"] == pytest.approx(np.mean(summary["per_client"]))
    if method == "local":  # nothing is received: a client that sits a round out keeps its own model, unchanged
        for r in rows:
            if not trained_record(r) and r["round"] > 0:
                before = next(x for x in rows if (x["round"], x["client"]) == (r["round"] - 1, r["client"]))
                assert (r["received_accuracy"], r["received_eval_loss"]) == (
                    before["received_accuracy"],
                    before["received_eval_loss"],
                )


@pytest.mark.slow
def test_after_local_training_only_the_participants_are_scored(tmp_path: Path) -> None:
    """``federation.evaluate: trained`` scores a client right after its local training: a round's mean is
    over the clients that trained; the others' received models are still scored and recorded."""
    config = load_config(overrides=[*PARTIAL, "method=fedit", "federation.evaluate=trained"])
    summary = SimulationEngine(config, tmp_path, quiet=True, report=False).run()
    rows = RunFolder(tmp_path).read_metrics()
    for h in summary["history"]:
        mine = [r for r in rows if r["round"] == h["round"]]
        assert len(mine) == 4 and h["received_mean_metric"] == pytest.approx(
            np.mean([r["received_accuracy"] for r in mine])
        )
        assert h["mean_metric"] == pytest.approx(np.mean([r["accuracy"] for r in mine if trained_record(r)]))
    latest = {r["client"]: r["accuracy"] for r in sorted(rows, key=lambda r: r["round"]) if trained_record(r)}
    assert summary["per_client"] == [latest.get(k) for k in range(4)], "each client's last trained score"


class PayloadLog(SimulationEngine):
    """Records the personal-expert tensors of every payload a client trains with and of every received
    model it is scored on: ``trained_with[(round, client)]``, ``scored_with[(round, client)]``."""

    def setup(self):  # type: ignore[no-untyped-def]
        fed, runner = super().setup()
        self.trained_with: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self.scored_with: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

        def personal(payload: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v.clone() for k, v in payload.items() if ".personal." in k}

        engine = self

        class Logging:
            def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
                return getattr(runner, name)

            def train(self, rnd, phase, payloads, keys, states, tick):  # type: ignore[no-untyped-def]
                engine.trained_with.update({(rnd, k): personal(p) for k, p in payloads.items()})
                return runner.train(rnd, phase, payloads, keys, states, tick)

            def evaluate_received(self, rnd, phase, payloads, states):  # type: ignore[no-untyped-def]
                engine.scored_with.update({(rnd, k): personal(p) for k, p in payloads.items()})
                return runner.evaluate_received(rnd, phase, payloads, states)

        return fed, Logging()


@pytest.mark.slow
def test_a_personal_start_reaches_a_client_first_sampled_after_the_first_federated_round() -> None:
    """``personal_init: warmup``: the start a client is scored with after the last warm-up round is what
    it trains from at its next round, also when it is not sampled in the first federated round."""
    overrides = [
        *PARTIAL,
        "seed=1",  # client 0 trains in warm-up round 1, sits out round 2, trains again in round 4
        "federation.rounds=4",
        "method=fedtreelora",
        "fedtreelora.warmup_rounds=1",
        "fedtreelora.tau=-1",
        "fedtreelora.personal=true",
        "fedtreelora.personal_init=warmup",
    ]
    engine = PayloadLog(load_config(overrides=overrides), quiet=True)
    engine.run()
    sampled = [engine.participants(rnd, 4) for rnd in range(4)]
    late = [k for k in sampled[0] if k not in sampled[1] and any(k in s for s in sampled[2:])]
    assert late, f"a client with a start that sits out the first federated round and trains later: {sampled}"
    for k in late:
        first = min(rnd for rnd in (2, 3) if k in sampled[rnd])
        assert engine.trained_with[(first, k)], f"client {k} trains from its personal start in round {first + 1}"
    for (rnd, k), scored in engine.scored_with.items():
        later = [t for t in range(rnd + 1, 4) if k in sampled[t]]
        if scored and later:
            got = engine.trained_with[(later[0], k)]
            assert got.keys() == scored.keys() and all(got[key].equal(scored[key]) for key in got), (rnd, k)
