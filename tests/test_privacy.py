"""Client-level differential privacy: the Gaussian mechanism on every upload (clipping to S, noise of
std z * S seeded per run seed, round and client), its configuration, and epsilon from Opacus's
accountants."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_upload import _rounds as upload_rounds

from fedtreelora.config import load_config
from fedtreelora.engines import SimulationEngine, build_federation
from fedtreelora.engines.round_table import RoundTable
from fedtreelora.engines.setup import Federation
from fedtreelora.errors import ConfigError
from fedtreelora.privacy import (
    GaussianUpdate,
    PrivacyLedger,
    epsilon,
    noise_multiplier_for,
    noise_seed,
    privacy_settings,
)
from fedtreelora.train import ClientResult, UploadContext, client_upload

Tensors = dict[str, torch.Tensor]


def _context(start: Tensors, state: Tensors, received: Tensors | None = None, client: int = 0, rnd: int = 0):
    return UploadContext(client=client, round=rnd, seed=0, start=start, state=state, received=received or {})


# --- the mechanism ------------------------------------------------------------------------------------------------
def test_clipping_scales_the_whole_update_to_the_bound() -> None:
    """An update of (3, 4) spread over two tensors has norm 5: clipped to S = 1 it is (0.6, 0.8)."""
    initial = {"m.a": torch.zeros(1, 1), "m.b": torch.full((1, 1), 2.0)}
    upload = {"m.a": torch.full((1, 1), 3.0), "m.b": torch.full((1, 1), 6.0)}
    context = _context(start=initial, state=upload)
    clip = GaussianUpdate(clip_norm=1.0, noise_multiplier=0.0, run_seed=0, initial=initial)
    out = clip(upload, context)
    assert out["m.a"].item() == pytest.approx(0.6, abs=1e-7)
    assert out["m.b"].item() == pytest.approx(2.8, abs=1e-7)
    assert GaussianUpdate.norm({k: out[k] - initial[k] for k in out}) == pytest.approx(1.0, abs=1e-6)
    # an update inside the bound goes through unscaled
    loose = GaussianUpdate(clip_norm=5.5, noise_multiplier=0.0, run_seed=0, initial=initial)(upload, context)
    assert all(loose[k].equal(upload[k]) for k in upload)
    assert upload["m.a"].item() == 3.0, "the upload's tensors are not changed in place"


def test_a_large_update_is_clipped_to_exactly_the_bound() -> None:
    g = torch.Generator().manual_seed(1)
    initial = {"x.lora_A": torch.randn(8, 64, generator=g), "x.lora_B": torch.zeros(64, 8)}
    upload = {k: v + 3 * torch.randn(v.shape, generator=g) for k, v in initial.items()}
    before = GaussianUpdate.norm({k: upload[k] - initial[k] for k in upload})
    assert before > 50
    out = GaussianUpdate(0.25, 0.0, 0, initial)(upload, _context(initial, upload))
    update = {k: out[k] - initial[k] for k in out}
    assert GaussianUpdate.norm(update) == pytest.approx(0.25, rel=1e-5)
    for k in upload:  # the direction is kept: every tensor scaled by the same S / norm
        torch.testing.assert_close(update[k], (upload[k] - initial[k]) * (0.25 / before), rtol=1e-4, atol=1e-6)


def test_the_update_is_measured_from_what_the_server_knows() -> None:
    """A tensor the server sent is measured from the payload; one it did not send (warm-up, the client's own
    expert) from the shared initialisation, never from the client's kept state, which the upload would
    otherwise carry un-noised."""
    initial = {"m.cluster.lora_A": torch.zeros(2, 2), "m.cluster.lora_B": torch.zeros(2, 2)}
    kept = {k: torch.full((2, 2), 5.0) for k in initial}  # the client's own state from an earlier round
    payload = {"m.cluster.lora_A": torch.full((2, 2), 1.0)}
    start = {**kept, **payload}
    trained = {k: v + 0.1 for k, v in start.items()}
    out = GaussianUpdate(100.0, 0.0, 0, initial)(dict(trained), _context(start, trained, payload))
    torch.testing.assert_close(out["m.cluster.lora_A"], trained["m.cluster.lora_A"])  # 1.1 = payload + 0.1
    torch.testing.assert_close(out["m.cluster.lora_B"], trained["m.cluster.lora_B"])  # 5.1 = initial + 5.1
    # with a bound below the kept state's distance from the initialisation, that state is clipped too
    tight = GaussianUpdate(1.0, 0.0, 0, initial)(dict(trained), _context(start, trained, payload))
    update = {"a": tight["m.cluster.lora_A"] - payload["m.cluster.lora_A"], "b": tight["m.cluster.lora_B"]}
    assert GaussianUpdate.norm(update) == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize(("clip_norm", "multiplier"), [(2.0, 0.7), (0.5, 3.0)])
def test_the_noise_has_std_z_times_s(clip_norm: float, multiplier: float) -> None:
    """200,000 coordinates: the sample std is within 1% of z * S (its standard error is 0.16%), so z or S
    alone (0.7 vs 1.4, 3 vs 1.5) or z^2 S would fail; the mean is 0 and the update itself is kept."""
    initial = {"a": torch.zeros(400, 250), "b": torch.zeros(100, 1000)}
    upload = {"a": torch.full((400, 250), 1e-4), "b": torch.zeros(100, 1000)}
    mech = GaussianUpdate(clip_norm, multiplier, run_seed=3, initial=initial)
    out = mech(upload, _context(initial, upload, client=2, rnd=4))
    noise = torch.cat([(out["a"] - upload["a"]).flatten(), out["b"].flatten()]).double()
    assert noise.numel() == 200_000
    assert float(noise.std()) == pytest.approx(multiplier * clip_norm, rel=0.01)
    assert abs(float(noise.mean())) < 4 * multiplier * clip_norm / math.sqrt(noise.numel())


def test_noise_is_reproducible_per_run_seed_round_and_client() -> None:
    initial = {"a": torch.zeros(3, 4), "b": torch.zeros(5)}
    upload = {"b": torch.ones(5), "a": torch.ones(3, 4)}
    mech = GaussianUpdate(1.0, 1.0, run_seed=7, initial=initial)

    def send(client: int, rnd: int, m: GaussianUpdate = mech) -> Tensors:
        return m(dict(upload), _context(initial, upload, client=client, rnd=rnd))

    first = send(1, 2)
    send(0, 2)  # another client in between changes nothing
    again = send(1, 2)
    assert all(first[k].equal(again[k]) for k in upload)
    fresh = GaussianUpdate(1.0, 1.0, run_seed=7, initial=initial)  # another process, another machine
    assert all(first[k].equal(send(1, 2, fresh)[k]) for k in upload)
    for other in (send(0, 2), send(1, 3), send(1, 2, GaussianUpdate(1.0, 1.0, 8, initial))):
        assert not any(first[k].equal(other[k]) for k in upload)
    assert len({noise_seed(s, r, c) for s in range(3) for r in range(3) for c in range(3)}) == 27
    # the noise is drawn by key name, whatever order the strategy lists the keys in
    reordered = mech({"a": upload["a"], "b": upload["b"]}, _context(initial, upload, client=1, rnd=2))
    assert all(first[k].equal(reordered[k]) for k in upload)
    # the client's round seed stands in when no engine gives a client and round
    outside = UploadContext(client=None, round=None, seed=11, start=initial, state=upload)
    assert all(mech(dict(upload), outside)[k].equal(mech(dict(upload), outside)[k]) for k in upload)


# --- configuration ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["privacy.clip_norm=1", "privacy.noise_multiplier=1", "privacy.target_epsilon=4"], "are both set; set one"),
        (["privacy.noise_multiplier=1"], r"privacy.clip_norm is not; .* set\s+privacy.clip_norm"),
        (["privacy.target_epsilon=4"], "privacy.target_epsilon is set but privacy.clip_norm is not"),
        (["privacy.clip_norm=1"], r"privacy.noise_multiplier=0 clips without noise"),
        (["privacy.clip_norm=1", "privacy.noise_multiplier=1", "privacy.delta=0.2"], r"lower privacy.delta"),
        (["privacy.clip_norm=0", "privacy.noise_multiplier=1"], r"privacy.clip_norm: Input should be greater than 0"),
        (["privacy.clip_norm=1", "privacy.noise_multiplier=1", "privacy.accountant=gdp"], "privacy.accountant"),
    ],
)
def test_privacy_settings_are_checked_with_the_fix(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=["data.num_clients=10", *overrides])


def test_privacy_is_off_by_default_and_resolves_when_on() -> None:
    assert not load_config().privacy.enabled and privacy_settings(load_config()) is None
    config = load_config(overrides=["data.num_clients=10", "privacy.clip_norm=0.5", "privacy.noise_multiplier=1.2"])
    settings = privacy_settings(config)
    assert settings is not None
    assert (settings.clip_norm, settings.noise_multiplier, settings.sample_rate) == (0.5, 1.2, 1.0)
    assert settings.accounted_multiplier == 1.2
    replaced = privacy_settings(
        load_config(overrides=["privacy.clip_norm=0.5", "privacy.noise_multiplier=1.2", "privacy.adjacency=replace"])
    )
    assert replaced is not None and replaced.accounted_multiplier == 0.6  # sensitivity 2S


TARGET = ["data.num_clients=20", "federation.rounds=10", "federation.fraction_train=0.25", "privacy.clip_norm=1",
          "privacy.target_epsilon=4", "privacy.delta=1e-4"]  # fmt: skip


def test_a_target_epsilon_gives_the_noise_that_meets_it() -> None:
    settings = privacy_settings(load_config(overrides=TARGET))
    assert settings is not None and settings.sample_rate == 0.25 and settings.planned_rounds == 10
    z = settings.noise_multiplier
    assert z == noise_multiplier_for(4.0, 1e-4, 0.25, 10, "rdp")
    assert 3.9 <= settings.epsilon(10) <= 4.0  # met, to within Opacus's tolerance of 0.01 (plus its search step)
    assert epsilon(z * 0.97, 0.25, 10, 1e-4) > 4.0, "a little less noise misses it"
    # replacing a client's data doubles the sensitivity: twice the noise for the same target
    replaced = privacy_settings(load_config(overrides=["privacy.adjacency=replace", *TARGET]))
    assert replaced is not None and replaced.noise_multiplier == pytest.approx(2 * z)
    # 0.3 of 10 clients is 3 sampled: the accountant uses the share actually sampled
    odd = load_config(overrides=["data.num_clients=10", "federation.fraction_train=0.33", "privacy.clip_norm=1",
                                 "privacy.noise_multiplier=1"])  # fmt: skip
    settings_odd = privacy_settings(odd)
    assert settings_odd is not None and settings_odd.sample_rate == 0.3


# --- the accountant -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["rdp", "prv"])
def test_epsilon_is_opacus_own_number(name: str) -> None:
    from opacus.accountants import PRVAccountant, RDPAccountant

    direct = {"rdp": RDPAccountant, "prv": PRVAccountant}[name]()
    for _ in range(12):
        direct.step(noise_multiplier=1.1, sample_rate=0.3)
    assert epsilon(1.1, 0.3, 12, 1e-5, name) == pytest.approx(direct.get_epsilon(delta=1e-5), rel=1e-9)


def test_epsilon_against_hand_set_numbers() -> None:
    """Reference values of Opacus 1.6.0's RDP accountant: z = 1, delta = 1e-5."""
    assert epsilon(1.0, 1.0, 1, 1e-5) == pytest.approx(4.7285, abs=1e-3)
    assert epsilon(1.0, 1.0, 10, 1e-5) == pytest.approx(19.0536, abs=1e-3)
    assert epsilon(1.0, 0.3, 10, 1e-5) == pytest.approx(7.8297, abs=1e-3)
    assert epsilon(1.0, 0.3, 0, 1e-5) == 0.0 and math.isinf(epsilon(0.0, 0.3, 1, 1e-5))
    with pytest.raises(ValueError, match="unknown accountant"):
        epsilon(1.0, 1.0, 1, 1e-5, "gdp")


@pytest.mark.parametrize("name", ["rdp", "prv"])
def test_epsilon_grows_with_rounds_and_falls_with_noise(name: str) -> None:
    by_round = [epsilon(1.0, 0.5, r, 1e-5, name) for r in range(1, 13)]
    assert all(a < b for a, b in zip(by_round, by_round[1:], strict=False))
    by_noise = [epsilon(z, 0.5, 8, 1e-5, name) for z in (0.6, 0.8, 1.0, 1.5, 2.0, 4.0)]
    assert all(a > b for a, b in zip(by_noise, by_noise[1:], strict=False))
    assert epsilon(1.0, 0.2, 8, 1e-5, name) < epsilon(1.0, 1.0, 8, 1e-5, name), "sampling amplifies"


def test_the_ledger_counts_rounds_with_uploads_and_each_clients_own() -> None:
    config = load_config(overrides=["data.num_clients=4", "federation.fraction_train=0.5", "privacy.clip_norm=1",
                                    "privacy.noise_multiplier=1", "privacy.delta=1e-3"])  # fmt: skip
    settings = privacy_settings(config)
    assert settings is not None
    ledger = PrivacyLedger(settings, 4)
    history: list[dict] = []
    for uploaders in ([0, 1], [], [0, 2]):
        history.append({"round": len(history), **ledger.round_fields(history, uploaders)})
    assert [h["uploaders"] for h in history] == [[0, 1], [], [0, 2]]
    assert [h["epsilon"] for h in history] == [epsilon(1.0, 0.5, n, 1e-3) for n in (1, 1, 2)]
    assert history[-1]["epsilon_server"] == epsilon(1.0, 1.0, 2, 1e-3)  # client 0 uploaded twice
    assert ledger.client_epsilons(history) == [epsilon(1.0, 1.0, n, 1e-3) for n in (2, 1, 1)] + [0.0]
    summary = ledger.summary(history)
    assert summary["upload_rounds"] == 2 and summary["epsilon"] == history[-1]["epsilon"]
    assert summary["noise_multiplier"] == 1.0 and summary["sample_rate"] == 0.5 and summary["accountant"] == "rdp"
    assert json.loads(json.dumps(summary)) == summary
    zero = PrivacyLedger(replace(settings, noise_multiplier=0.0), 4)  # clipping alone: no finite epsilon
    assert zero.round_fields([], [0])["epsilon"] is None


def test_the_round_table_notes_epsilon() -> None:
    table = RoundTable(total_rounds=3, num_clients=4)
    record = {"round": 0, "phase": "federated", "clients": [0, 1], "mean_metric": 0.5, "mean_train_loss": 0.4,
              "epsilon": 1.234, "epsilon_server": 3.5}  # fmt: skip
    assert table.row(record, [0.5], 1.0).plain.split("\n")[-1].endswith("eps 1.23/3.50 server")
    assert table.row({**record, "epsilon_server": 1.234}, [0.5], 1.0).plain.endswith("eps 1.23")


# --- every way a client trains ------------------------------------------------------------------------------------
K = 3
RND = 1  # a federated round of fedtreelora: the cluster expert comes from the server


@pytest.fixture(scope="module")
def fed() -> Federation:
    config = load_config(
        overrides=[
            "method=fedtreelora", "model.num_layers=1", "model.max_length=16", f"data.num_clients={K}",
            "data.n_train=16", "data.n_val=8", "train.batch_size=8", "train.eval_batch_size=8",
            f"train.clients_per_pass={K}", "fedtreelora.warmup_rounds=1",
            "privacy.clip_norm=0.05", "privacy.noise_multiplier=0.5", "privacy.delta=1e-3",
        ]
    )  # fmt: skip
    return build_federation(config)


def _rounds(fed: Federation, clients: list[int], *, together: bool) -> list[ClientResult]:
    """One federated round of ``clients`` with the federation's own upload chain (test_upload's inputs)."""
    return upload_rounds(fed, clients, fed.upload_transforms, together=together)


@pytest.mark.slow
def test_vectorised_and_one_client_uploads_agree_bit_for_bit(fed: Federation) -> None:
    """The privacy section puts the mechanism in the federation's chain; a pass of one client is one client
    alone, bit for bit, noise included; clients sharing a pass (whose training sums in another order) get
    the same noise and the same clipping, so their uploads differ only by training's float rounding."""
    (mech,) = fed.upload_transforms
    assert isinstance(mech, GaussianUpdate) and mech.noise_std == pytest.approx(0.025)
    alone = _rounds(fed, [0, 1, 2], together=False)
    single = [_rounds(fed, [k], together=True)[0] for k in range(K)]
    shared = _rounds(fed, [0, 1, 2], together=True)
    for k in range(K):
        for x in alone[k].upload:
            assert single[k].upload[x].equal(alone[k].upload[x]), f"client {k}, {x}"
            torch.testing.assert_close(shared[k].upload[x], alone[k].upload[x], rtol=0, atol=1e-4)
        noised = {x: alone[k].upload[x] - alone[k].state[x] for x in alone[k].upload}
        assert GaussianUpdate.norm(noised) > 0.5 * mech.noise_std * math.sqrt(sum(t.numel() for t in noised.values()))
        assert all(x.endswith(("lora_A", "lora_B")) for x in alone[k].upload)


class RecordingEngine(SimulationEngine):
    """The in-process engine keeping each upload before the mechanism (with its context) and as the server
    receives it."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.before: dict[tuple[int, int], tuple[Tensors, UploadContext]] = {}
        self.received: dict[tuple[int, int], Tensors] = {}

    def build_federation(self) -> Federation:
        fed = super().build_federation()

        def keep(upload: Tensors, context: UploadContext) -> Tensors:
            assert context.round is not None and context.client is not None
            self.before[(context.round, context.client)] = (dict(upload), context)
            return upload

        self.fed = replace(fed, upload_transforms=(keep, *fed.upload_transforms))
        return self.fed

    def tamper(self, rnd: int, client: int, upload: Tensors) -> Tensors:
        self.received[(rnd, client)] = upload
        return upload


@pytest.mark.slow
@pytest.mark.parametrize("clients_per_pass", [1, 3])
def test_a_private_run_noises_every_upload_warm_up_included(tmp_path: Path, clients_per_pass: int) -> None:
    """FedTreeLoRA, 1 warm-up round then 2 federated rounds, 2 of 3 clients sampled per round: what the
    server receives, warm-up B included, is the mechanism's output; epsilon is in every round's record,
    every client's metrics line and the summary."""
    config = load_config(
        overrides=[
            "method=fedtreelora", "model.num_layers=1", "model.max_length=16", f"data.num_clients={K}",
            "data.n_train=16", "data.n_val=8", "train.batch_size=8", f"train.clients_per_pass={clients_per_pass}",
            "federation.rounds=3", "federation.fraction_train=0.67", "fedtreelora.warmup_rounds=1",
            "logging.tensorboard=false", "privacy.clip_norm=0.05", "privacy.noise_multiplier=0.8",
            "privacy.delta=1e-3",
        ]
    )  # fmt: skip
    engine = RecordingEngine(config, tmp_path, quiet=True, report=False)
    summary = engine.run()
    (_, mech) = engine.fed.upload_transforms
    assert isinstance(mech, GaussianUpdate)
    assert sorted(engine.received) == sorted(engine.before) and {r for r, _ in engine.received} == {0, 1, 2}
    for (rnd, k), upload in engine.received.items():
        raw, context = engine.before[(rnd, k)]
        expected = client_upload(dict(raw), context.start, list(raw), (mech,), client=k, rnd=rnd,
                                 received=context.received)  # fmt: skip
        assert all(upload[x].equal(expected[x]) for x in raw), (rnd, k)
        assert not any(upload[x].equal(raw[x]) for x in raw), f"round {rnd}, client {k}: sent as trained"
        if rnd == 0:  # warm-up: nothing received, the update is measured from the shared initialisation
            assert not context.received
    history = summary["history"]
    steps = [len(h["uploaders"]) > 0 for h in history]
    assert steps == [True, True, True] and all(len(h["uploaders"]) == 2 for h in history)
    assert [h["epsilon"] for h in history] == [epsilon(0.8, 2 / 3, r, 1e-3) for r in (1, 2, 3)]
    privacy = summary["privacy"]
    assert privacy["epsilon"] == history[-1]["epsilon"] and privacy["upload_rounds"] == 3
    assert privacy["epsilon_server"] == history[-1]["epsilon_server"] == max(privacy["per_client_epsilon_server"])
    counts = [sum(k in h["uploaders"] for h in history) for k in range(K)]
    assert privacy["per_client_epsilon_server"] == [epsilon(0.8, 1.0, n, 1e-3) for n in counts]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 * K and all("epsilon" in r and "epsilon_server" in r for r in lines)
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["privacy"] == privacy
