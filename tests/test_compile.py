"""``train.compile``: a client's round through the torch.compile'd model equals the eager one."""

from __future__ import annotations

import shutil

import pytest
import torch

from fedtreelora.config import load_config
from fedtreelora.engines import build_federation
from fedtreelora.engines.setup import client_seed
from fedtreelora.train import run_client_round


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
def test_compiled_round_matches_eager() -> None:
    results = []
    for compiled in (False, True):
        config = load_config(
            overrides=[
                "method=fedtreelora",
                "model.num_layers=1",
                "model.dropout=0.1",  # and the backbone's own: masks are drawn eagerly, per client
                "model.max_length=32",
                "data.num_clients=2",
                "data.n_train=16",
                "data.n_val=8",
                "train.batch_size=8",
                "train.eval_batch_size=8",
                "train.local_epochs=1",
                "train.clients_per_pass=1",
                f"train.compile={str(compiled).lower()}",
                "fedtreelora.warmup_rounds=1",
            ]
        )
        fed = build_federation(config)
        model = fed.classifier.model
        assert (getattr(model, "_compiled_call_impl", None) is not None) == compiled
        rnd = 1  # federated phase: cluster expert and lambda trained, external expert frozen
        g = torch.Generator().manual_seed(0)
        payload = {
            k: 0.05 * torch.randn(v.shape, generator=g) for k, v in fed.initial_state.items() if ".external." in k
        }
        results.append(
            run_client_round(
                fed.bank, fed.classifier.tokenizer, phase=fed.strategy.phase(rnd), state=fed.initial_state,
                payload=payload, upload_keys=list(fed.strategy.upload_keys(rnd, 0)), train_data=fed.train_data[0],
                val_data=fed.val_data[0], seed=client_seed(config.seed, rnd, 0), settings=fed.settings,
                device=fed.device,
            )
        )  # fmt: skip
    eager, compiled_result = results
    assert eager.metrics["steps"] == compiled_result.metrics["steps"] == 2
    moved = max(float((eager.state[k] - fed.initial_state[k]).abs().max()) for k in eager.upload)
    assert moved > 1e-3, "training must move the adapters for the comparison to mean anything"
    for key, value in eager.state.items():
        # Fused kernels sum in another order; Adam's normalised first steps magnify that for tiny gradients.
        torch.testing.assert_close(compiled_result.state[key], value, rtol=1e-4, atol=5e-5, msg=key)
    assert compiled_result.metrics["train_loss"] == pytest.approx(eager.metrics["train_loss"], abs=1e-5)
    assert compiled_result.metrics["eval_loss"] == pytest.approx(eager.metrics["eval_loss"], abs=1e-5)
    assert compiled_result.metrics["accuracy"] == eager.metrics["accuracy"]
