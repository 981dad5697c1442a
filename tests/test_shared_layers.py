"""Depth-limited FedAvg (``fedit.shared_layers``): the option's forms and range, what the server sends and
takes, and bit-for-bit equalities with FedIT (every layer shared) and local training (none)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from fedtreelora.adapters import Site
from fedtreelora.config import load_config
from fedtreelora.engines import SimulationEngine
from fedtreelora.errors import ConfigError
from fedtreelora.strategies import FederationContext, get_strategy
from fedtreelora.strategies.fedit import FedITOptions, parse_shared_layers, resolve_shared_layers

N, LAYERS = 4, 2
SITES = tuple(Site(f"enc.{layer}.q", layer, "q", 3, 2) for layer in range(LAYERS))


def context() -> FederationContext:
    """Four clients, two layers with one adapted projection each."""
    shapes = {}
    for s in SITES:
        for e in ("shared", "local"):
            shapes[f"{s.name}.{e}.lora_A"] = (1, s.d_in)
            shapes[f"{s.name}.{e}.lora_B"] = (s.d_out, 1)
    return FederationContext(N, SITES, LAYERS, ("q",), 10, (10,) * N, 0, 1, shapes)


def uploads(keys: list[str]) -> dict[int, dict[str, torch.Tensor]]:
    """Client k uploads ``keys``: A = k + 1, B = 10 * (k + 1) + layer."""
    out = {}
    for k in range(N):
        out[k] = {}
        for key in keys:
            layer = int(key.split(".")[1])
            value = float(k + 1) if key.endswith("lora_A") else 10.0 * (k + 1) + layer
            out[k][key] = torch.full((1, 3) if key.endswith("lora_A") else (2, 1), value)
    return out


# --- the option: forms, canonical values, errors that name the field -----------------------------------


@pytest.mark.parametrize(
    ("value", "canonical"),
    [
        ("all", "all"),
        ("none", "none"),
        ("first:3", "first:3"),
        ("last:0", "last:0"),
        (" first:2 ", "first:2"),
        ([2, 0], [0, 2]),
        ([], []),
        ("0,2", [0, 2]),
    ],
)
def test_forms_parse_to_their_canonical_value(value: object, canonical: object) -> None:
    assert parse_shared_layers(value) == canonical
    assert FedITOptions(shared_layers=value).shared_layers == canonical


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("some", "first:K, last:K"),
        ("first:-1", "first:K, last:K"),
        ("first:", "first:K, last:K"),
        ("middle:2", "first:K, last:K"),
        (3, "write first:3 for the first 3 layers, or [3] for layer 3 alone"),
        ({"first": 3}, "no space after the colon"),
        ([1, 1], "distinct"),
        ([-1], "non-negative"),
        ([True], "non-negative integers"),
        (None, "first:K, last:K"),
    ],
)
def test_bad_syntax_names_the_field_and_the_forms(value: object, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(method="fedit", fedit={"shared_layers": value})
    assert "fedit.shared_layers" in str(caught.value) and message in str(caught.value)


def test_the_command_line_forms() -> None:
    assert load_config(overrides=["fedit.shared_layers=first:2"]).fedit.shared_layers == "first:2"
    assert load_config(overrides=["fedit.shared_layers=[3, 1]"]).fedit.shared_layers == [1, 3]
    assert load_config(overrides=["fedit.shared_layers=1,3"]).fedit.shared_layers == [1, 3]


@pytest.mark.parametrize(
    ("spec", "layers"),
    [
        ("all", (0, 1, 2, 3, 4, 5)),
        ("none", ()),
        ("first:0", ()),
        ("last:0", ()),
        ("first:2", (0, 1)),
        ("last:2", (4, 5)),
        ("first:6", (0, 1, 2, 3, 4, 5)),
        ([5, 0], (0, 5)),
    ],
)
def test_resolved_against_the_model(spec: str | list[int], layers: tuple[int, ...]) -> None:
    assert resolve_shared_layers(spec, 6) == layers


@pytest.mark.parametrize("spec", ["first:7", "last:7", [6], [0, 9]])
def test_out_of_range_names_the_field_and_the_valid_range(spec: str | list[int]) -> None:
    with pytest.raises(ConfigError) as caught:
        resolve_shared_layers(spec, 6)
    text = str(caught.value)
    assert "fedit.shared_layers" in text and "K in 0..6" in text and "indices in 0..5" in text


def test_out_of_range_is_an_error_when_the_strategy_is_built() -> None:
    with pytest.raises(ConfigError, match=r"fedit\.shared_layers='first:3'.*K in 0\.\.2"):
        get_strategy("fedit")(FedITOptions(shared_layers="first:3"), context())


@pytest.mark.parametrize("method", ["ffa", "fedsa", "feddpa"])
def test_fedit_derived_methods_share_every_layer_and_say_so(method: str) -> None:
    assert getattr(load_config(method=method), method).shared_layers == "all"
    with pytest.raises(ConfigError) as caught:
        load_config(method=method, **{method: {"shared_layers": "first:1"}})
    assert f"{method}.shared_layers" in str(caught.value) and "fedit.shared_layers" in str(caught.value)


# --- the server side on tiny tensors ---------------------------------------------------------------------


def test_first_layer_shared_second_local() -> None:
    """first:1 on two layers: only layer 0's A and B go up and come down; layer 1 stays with each client."""
    strategy = get_strategy("fedit")(FedITOptions(shared_layers="first:1"), context())
    layer0 = [f"{SITES[0].name}.shared.{f}" for f in ("lora_A", "lora_B")]
    assert list(strategy.upload_keys(0, 2)) == layer0
    strategy.aggregate(0, uploads(list(strategy.upload_keys(0, 0))))
    for k in range(N):
        payload = strategy.payload(1, k)
        assert list(payload) == layer0, "nothing of layer 1 is sent: each client keeps its own"
        assert torch.equal(payload[layer0[0]], torch.full((1, 3), 2.5))
        assert torch.equal(payload[layer0[1]], torch.full((2, 1), 25.0))
    assert strategy.sharing_labels().tolist() == [[0, 0, 0, 0], [0, 1, 2, 3]]
    assert strategy.summary() == {"shared_layers": [0]}


def test_none_sends_and_takes_nothing_and_all_is_fedit() -> None:
    none = get_strategy("fedit")(FedITOptions(shared_layers="none"), context())
    assert list(none.upload_keys(0, 0)) == [] and none.payload(1, 0) == {}
    assert (
        none.sharing_labels().tolist()
        == get_strategy("local")(get_strategy("local").Options(), context()).sharing_labels().tolist()
    )
    full = get_strategy("fedit")(FedITOptions(shared_layers=[0, 1]), context())
    plain = get_strategy("fedit")(FedITOptions(), context())
    assert list(full.upload_keys(0, 0)) == list(plain.upload_keys(0, 0)) == plain.expert_keys("shared")
    assert full.sharing_labels().tolist() == plain.sharing_labels().tolist() == [[0] * 4] * 2
    assert plain.summary() == {"shared_layers": [0, 1]}


# --- whole runs, bit for bit -----------------------------------------------------------------------------

SMALL = [
    "model.num_layers=2",
    "model.max_length=32",
    "model.dropout=0.1",
    "data.num_clients=3",
    "data.n_train=16",
    "data.n_val=16",
    "train.local_epochs=1",
    "train.batch_size=8",
    "federation.rounds=3",
    "logging.tensorboard=false",
]
CLIENTS = 3
SCORES = ("train_loss", "accuracy", "eval_loss", "received_accuracy", "received_eval_loss")
Rows = dict[tuple[int, int], dict[str, Any]]
Run = tuple[dict[str, Any], Rows, Path]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Run]]:
    """Run a small experiment once per set of overrides, on one torch thread: (summary, rows by (round,
    client), run folder)."""
    cache: dict[tuple[str, ...], Run] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def run(*overrides: str) -> Run:
        if overrides not in cache:
            out = tmp_path_factory.mktemp("run")
            summary = SimulationEngine(load_config(overrides=[*SMALL, *overrides]), out, quiet=True, report=False).run()
            lines = (out / "metrics.jsonl").read_text().splitlines()
            cache[overrides] = summary, {(r["round"], r["client"]): r for r in map(json.loads, lines) if r}, out
        return cache[overrides]

    yield run
    torch.set_num_threads(threads)


def scores(rows: Rows) -> dict[tuple[int, int], dict[str, float]]:
    return {key: {f: row[f] for f in SCORES} for key, row in rows.items()}


def adapters(folder: Path, client: int, expert: str) -> dict[str, torch.Tensor]:
    """A client's final adapters keyed by site and factor (the expert's name left out)."""
    tensors = load_file(folder / "clients" / f"client_{client:03d}.safetensors")
    return {key.replace(f".{expert}.", "."): t for key, t in tensors.items() if f".{expert}." in key}


def assert_same_adapters(mine: Path, theirs: Path, expert_mine: str, expert_theirs: str) -> None:
    for k in range(CLIENTS):
        a, b = adapters(mine, k, expert_mine), adapters(theirs, k, expert_theirs)
        assert a.keys() == b.keys() and a
        for key, value in a.items():
            assert torch.equal(value, b[key]), (k, key)


@pytest.mark.slow
@pytest.mark.parametrize("every_layer", ["fedit.shared_layers=first:2", "fedit.shared_layers=[0, 1]"])
def test_every_layer_shared_is_fedit_bit_for_bit(runs, every_layer: str) -> None:  # type: ignore[no-untyped-def]
    plain, plain_rows, plain_dir = runs("method=fedit")
    full, full_rows, full_dir = runs("method=fedit", every_layer)
    assert scores(full_rows) == scores(plain_rows)
    assert full["by_convention"] == plain["by_convention"]
    assert full["labels"] == plain["labels"] and full["shared_layers"] == plain["shared_layers"] == [0, 1]
    assert_same_adapters(full_dir, plain_dir, "shared", "shared")


@pytest.mark.slow
def test_no_layer_shared_is_local_training_bit_for_bit(runs) -> None:  # type: ignore[no-untyped-def]
    none, none_rows, none_dir = runs("method=fedit", "fedit.shared_layers=none")
    local, local_rows, local_dir = runs("method=local")
    assert scores(none_rows) == scores(local_rows)
    assert none["by_convention"] == local["by_convention"]
    assert none["labels"] == local["labels"] and none["shared_layers"] == []
    assert all(row["uplink_bytes"] == row["downlink_bytes"] == 0 for row in none_rows.values())
    assert_same_adapters(none_dir, local_dir, "shared", "local")


@pytest.mark.slow
def test_first_layer_only_differs_from_both_and_sends_half(runs) -> None:  # type: ignore[no-untyped-def]
    mixed, mixed_rows, _ = runs("method=fedit", "fedit.shared_layers=first:1")
    _, fedit_rows, _ = runs("method=fedit")
    _, local_rows, _ = runs("method=local")
    assert mixed["labels"] == [[0] * CLIENTS, list(range(CLIENTS))] and mixed["cuts"] == [1, CLIENTS]
    assert mixed["shared_layers"] == [0]
    # Round 0 trains from the same initialisation in all three: its scores after training agree.
    trained = ("train_loss", "accuracy", "eval_loss")
    for k in range(CLIENTS):
        for other in (fedit_rows, local_rows):
            assert {f: mixed_rows[(0, k)][f] for f in trained} == {f: other[(0, k)][f] for f in trained}
    later = [key for key in mixed_rows if key[0] >= 1]
    for other in (fedit_rows, local_rows):
        assert any(mixed_rows[k]["train_loss"] != other[k]["train_loss"] for k in later)
        assert any(mixed_rows[k]["received_eval_loss"] != other[k]["received_eval_loss"] for k in mixed_rows)
    for key, row in mixed_rows.items():
        assert 2 * row["uplink_bytes"] == fedit_rows[key]["uplink_bytes"], key
        assert 2 * row["downlink_bytes"] == fedit_rows[key]["downlink_bytes"], key
