"""Training several clients in one pass equals training them one at a time, dropout included."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from fedtreelora.config import load_config
from fedtreelora.engines import build_federation
from fedtreelora.engines.setup import Federation, client_seed
from fedtreelora.train import ClientResult, run_client_round, run_clients_round

K = 4
RND = 1  # a federated round: fedtreelora trains the cluster expert and lambda with a frozen external expert


def _federation(method: str, num_slots: int) -> Federation:
    """MiniLM cut to 2 layers with dropout on: LoRA input dropout 0.1 and the backbone's own (hidden and
    attention-probability dropout, 0.1 each), every client holding 24 training and 20 validation examples."""
    config = load_config(
        overrides=[
            f"method={method}",
            "model.num_layers=2",
            "model.dropout=0.1",
            f"data.num_clients={K}",
            "data.n_train=24",
            "data.n_val=20",
            "train.batch_size=8",
            "train.eval_batch_size=8",
            f"train.clients_per_pass={num_slots}",
            "fedtreelora.warmup_rounds=1",
        ]
    )
    fed = build_federation(config)
    assert fed.classifier.model.config.hidden_dropout_prob > 0
    assert fed.classifier.model.config.attention_probs_dropout_prob > 0
    return fed


def _inputs(fed: Federation) -> tuple[list[dict], list[dict], list[list[str]], list[int]]:
    """Every client's state, payload, upload keys and round seed (distinct random adapters per client)."""
    g = torch.Generator().manual_seed(0)
    states = [
        {key: v + 0.05 * torch.randn(v.shape, generator=g) for key, v in fed.initial_state.items()} for _ in range(K)
    ]
    payloads = [
        {key: 0.05 * torch.randn(v.shape, generator=g) for key, v in fed.initial_state.items() if ".external." in key}
        for _ in range(K)
    ]
    keys = [list(fed.strategy.upload_keys(RND, k)) for k in range(K)]
    seeds = [client_seed(fed.config.seed, RND, k) for k in range(K)]
    return states, payloads, keys, seeds


def _alone(fed: Federation, k: int) -> ClientResult:
    states, payloads, keys, seeds = _inputs(fed)
    return run_client_round(
        fed.bank, fed.classifier.tokenizer, phase=fed.strategy.phase(RND), state=states[k], payload=payloads[k],
        upload_keys=keys[k], train_data=fed.train_data[k], val_data=fed.val_data[k], seed=seeds[k],
        settings=fed.settings, device=fed.device,
    )  # fmt: skip


def _together(fed: Federation, clients: Sequence[int]) -> list[ClientResult]:
    states, payloads, keys, seeds = _inputs(fed)
    return run_clients_round(
        fed.bank, fed.classifier.tokenizer, phase=fed.strategy.phase(RND), states=[states[k] for k in clients],
        payloads=[payloads[k] for k in clients], upload_keys=[keys[k] for k in clients],
        train_data=[fed.train_data[k] for k in clients], val_data=[fed.val_data[k] for k in clients],
        seeds=[seeds[k] for k in clients], settings=fed.settings, device=fed.device,
    )  # fmt: skip


def _assert_same_round(b: ClientResult, a: ClientResult, start: dict[str, torch.Tensor], msg: str) -> None:
    """``b`` is ``a`` up to float rounding, and training moved the adapters."""
    assert a.metrics["steps"] == b.metrics["steps"] == 6
    moved = max(float((a.state[key] - start.get(key, a.state[key])).abs().max()) for key in a.upload)
    assert moved > 1e-3, "training must move the adapters for the comparison to mean anything"
    for key in a.state:
        # float32 sums in another order (common padding, batched matmuls), which Adam's normalised steps
        # can magnify for elements with tiny gradients: 5e-5 absolute on adapters of magnitude ~0.2.
        torch.testing.assert_close(b.state[key], a.state[key], rtol=1e-4, atol=5e-5, msg=f"{msg} {key}")
    assert b.metrics["train_loss"] == pytest.approx(a.metrics["train_loss"], abs=1e-5), msg
    assert b.metrics["accuracy"] == a.metrics["accuracy"], msg
    assert b.metrics["eval_loss"] == pytest.approx(a.metrics["eval_loss"], abs=1e-5), msg


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fedtreelora", "fedit"])
def test_vectorised_clients_match_one_at_a_time(method: str) -> None:
    fed = _federation(method, K)
    states = _inputs(fed)[0]
    one_at_a_time = [_alone(fed, k) for k in range(K)]
    together = _together(fed, range(K))
    for k in range(K):
        _assert_same_round(together[k], one_at_a_time[k], states[k], f"client {k}")


@pytest.mark.slow
def test_a_clients_round_does_not_depend_on_its_companions() -> None:
    """Client 0 alone, in slot 0 of a pass of 3 and in slot 1 of a pass with other companions: the same
    dropout masks (drawn from its own seed), hence the same adapters and losses."""
    fed = _federation("fedtreelora", 3)
    start = _inputs(fed)[0][0]
    alone = _alone(fed, 0)
    first = _together(fed, [0, 1, 2])[0]
    second = _together(fed, [3, 0, 1])[1]
    _assert_same_round(first, alone, start, "client 0 in slot 0 of (0, 1, 2)")
    _assert_same_round(second, alone, start, "client 0 in slot 1 of (3, 0, 1)")


@pytest.mark.slow
def test_received_models_score_the_same_together_and_alone() -> None:
    """The received-model evaluation of a vectorised pass equals scoring each client alone, with a trunk
    layer (cluster expert alone) below a branched one (lambda mixing)."""
    import dataclasses

    from fedtreelora.train.received import evaluate_received, evaluate_received_together

    fed = _federation("fedtreelora", K)
    states, payloads, _, seeds = _inputs(fed)
    phase = dataclasses.replace(fed.strategy.phase(RND), single_layers=frozenset({0}))
    common = {"phase": phase, "settings": fed.settings, "device": fed.device}
    alone = [
        evaluate_received(
            fed.bank, fed.classifier.tokenizer, state=states[k], payload=payloads[k], train_data=fed.train_data[k],
            val_data=fed.val_data[k], seed=seeds[k], **common,
        )
        for k in range(K)
    ]  # fmt: skip
    together = evaluate_received_together(
        fed.bank, fed.classifier.tokenizer, states=states, payloads=payloads, val_data=fed.val_data, seeds=seeds,
        **common,
    )  # fmt: skip
    assert len({round(a["eval_loss"], 6) for a in alone}) > 1, "the clients' models differ"
    for k in range(K):
        assert together[k]["accuracy"] == alone[k]["accuracy"], k
        assert together[k]["eval_loss"] == pytest.approx(alone[k]["eval_loss"], abs=1e-5), k
    # the trunk layer ignores lambda: changing it there changes nothing
    moved = {**states[0], **{f"{s.name}.mix_logit": torch.tensor(3.0) for s in fed.bank.sites if s.layer == 0}}
    again = evaluate_received(
        fed.bank, fed.classifier.tokenizer, state=moved, payload=payloads[0], train_data=fed.train_data[0],
        val_data=fed.val_data[0], seed=seeds[0], **common,
    )  # fmt: skip
    assert again == alone[0]
