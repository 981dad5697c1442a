"""Exported PEFT adapters give the same logits as the fedtreelora model they come from.

Real runs (MiniLM cut to 2 layers, 4 clients, tiny data); the exported adapter is loaded with stock
``PeftModel.from_pretrained`` on a plain transformers backbone and compared with the run's own model
(``build_federation`` from the run's config.yaml, the client's state written into slot 0).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification
from transformers import logging as hf_logging

from fedtreelora.cli import main
from fedtreelora.config import load_config
from fedtreelora.engines import Federation, SimulationEngine, build_federation
from fedtreelora.export import ExportError, export_client, export_trunk, trunk_layers

pytestmark = pytest.mark.slow

#: logits of the exported adapter and of the fedtreelora model agree to this (float32; seen: ~1e-7)
ATOL = 1e-5

TINY = [
    "model.num_layers=2",
    "data.num_clients=4",
    "data.n_train=32",
    "data.n_val=16",
    "train.batch_size=16",
    "federation.rounds=3",
    "fedtreelora.warmup_rounds=1",
    "fedtreelora.tau=-1",  # every layer leaves the root: every client has a non-zero external expert
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A FedTreeLoRA run with client-local heads, a FedIT run with the shared frozen head, and a FedTreeLoRA
    run with the personal expert."""
    out = {}
    for label, method, extra in (
        ("fedtreelora", "fedtreelora", ["model.head=local"]),
        ("fedit", "fedit", []),
        ("personal", "fedtreelora", ["fedtreelora.personal=true"]),
    ):
        folder = tmp_path_factory.mktemp(label)
        SimulationEngine(load_config(overrides=TINY + extra, method=method), folder, quiet=True).run()
        out[label] = folder
    return out


_FEDERATIONS: dict[Path, Federation] = {}


def federation(run_dir: Path) -> Federation:
    """The run's own model, rebuilt from its config.yaml (cached per run)."""
    if run_dir not in _FEDERATIONS:
        _FEDERATIONS[run_dir] = build_federation(load_config(run_dir / "config.yaml"))
    return _FEDERATIONS[run_dir]


def batch(fed: Federation) -> dict[str, torch.Tensor]:
    texts = fed.dataset.validation.texts[:8]
    return dict(
        fed.classifier.tokenizer(list(texts), padding=True, truncation=True, max_length=64, return_tensors="pt")
    )


def run_logits(fed: Federation, state: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """(batch, labels) logits of the fedtreelora model holding ``state`` in the run's last phase."""
    fed.bank.write_slot(0, state)
    fed.bank.configure(fed.strategy.phase(fed.config.federation.rounds - 1))
    model = fed.classifier.model.eval()
    with torch.no_grad():
        return model(**inputs).logits.float()


def peft_logits(minilm_path: str, adapter: Path, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """(batch, labels) logits of stock peft loading the adapter onto a plain 2-layer MiniLM."""
    info = json.loads((adapter / "fedtreelora_export.json").read_text())
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the plain backbone's fresh head is reported; the adapter replaces it
    try:
        base = AutoModelForSequenceClassification.from_pretrained(
            minilm_path, num_labels=info["num_labels"], num_hidden_layers=info["num_hidden_layers"]
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        return model(**inputs).logits.float()


def sigmoid_logits(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.sigmoid(torch.stack([v for k, v in state.items() if k.endswith(".mix_logit")]))


def test_fedtreelora_client_exports_as_one_rank_2r_lora(
    runs: dict[str, Path], minilm_path: str, tmp_path: Path
) -> None:
    run = runs["fedtreelora"]
    states = [load_file(str(p)) for p in sorted((run / "clients").glob("client_*.safetensors"))]
    # the client whose lambdas moved furthest from their 0.5 start
    client = max(range(len(states)), key=lambda k: float((sigmoid_logits(states[k]) - 0.5).abs().max()))
    state = states[client]
    assert float((sigmoid_logits(state) - 0.5).abs().max()) > 1e-3, "lambda must have moved"
    assert all(float(v.abs().max()) > 0 for k, v in state.items() if ".external.lora_B" in k), "external expert"
    assert any(k.startswith("classifier.") for k in state), "the run trains client-local heads"

    adapter = export_client(run, client, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (16, 32.0), "rank 2r, alpha doubled so alpha/r is kept"
    assert config["modules_to_save"] == ["classifier"]

    fed = federation(run)
    inputs = batch(fed)
    expected = run_logits(fed, state, inputs)
    got = peft_logits(minilm_path, adapter, inputs)
    assert torch.allclose(got, expected, atol=ATOL, rtol=0), (got - expected).abs().max()

    # The comparison is sharp: dropping the external expert moves the logits far beyond the tolerance.
    no_external = {k: torch.zeros_like(v) if ".external." in k else v for k, v in state.items()}
    assert (run_logits(fed, no_external, inputs) - expected).abs().max() > 100 * ATOL


def test_personal_expert_exports_at_weight_one_in_a_rank_3r_lora(
    runs: dict[str, Path], minilm_path: str, tmp_path: Path
) -> None:
    run = runs["personal"]
    state = load_file(str(run / "clients" / "client_001.safetensors"))
    assert all(float(v.abs().max()) > 0 for k, v in state.items() if ".personal.lora_B" in k), "personal trained"
    adapter = export_client(run, 1, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 24, "cluster, external and personal experts side by side"
    fed = federation(run)
    inputs = batch(fed)
    expected = run_logits(fed, state, inputs)
    got = peft_logits(minilm_path, adapter, inputs)
    assert torch.allclose(got, expected, atol=ATOL, rtol=0), (got - expected).abs().max()
    no_personal = {k: torch.zeros_like(v) if ".personal.lora_B" in k else v for k, v in state.items()}
    assert (run_logits(fed, no_personal, inputs) - expected).abs().max() > 100 * ATOL


def test_fedit_client_exports_at_rank_r_with_the_shared_head(
    runs: dict[str, Path], minilm_path: str, tmp_path: Path
) -> None:
    run = runs["fedit"]
    adapter = export_client(run, 2, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (8, 16.0)
    fed = federation(run)
    inputs = batch(fed)
    expected = run_logits(fed, load_file(str(run / "clients" / "client_002.safetensors")), inputs)
    got = peft_logits(minilm_path, adapter, inputs)
    assert torch.allclose(got, expected, atol=ATOL, rtol=0), (got - expected).abs().max()


def test_fedit_trunk_is_the_average_expert_on_every_layer(
    runs: dict[str, Path], minilm_path: str, tmp_path: Path
) -> None:
    run = runs["fedit"]
    assert trunk_layers(run) == [0, 1]
    adapter = export_trunk(run, tmp_path / "trunk")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [0, 1] and config["r"] == 8
    states = [load_file(str(p)) for p in sorted((run / "clients").glob("client_*.safetensors"))]
    mean = {k: torch.stack([s[k] for s in states]).mean(0) for k in states[0] if ".shared.lora_" in k}
    fed = federation(run)
    inputs = batch(fed)
    expected = run_logits(fed, mean, inputs)
    got = peft_logits(minilm_path, adapter, inputs)
    assert torch.allclose(got, expected, atol=ATOL, rtol=0), (got - expected).abs().max()


def test_no_trunk_when_every_layer_branches(runs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="no layer is shared by all clients"):
        export_trunk(runs["fedtreelora"], tmp_path / "trunk")


def _copy_with_meta(run: Path, tmp_path: Path, **final_phase: object) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run / "clients", copy / "clients")
    shutil.copy(run / "summary.json", copy / "summary.json")
    meta = json.loads((copy / "clients" / "meta.json").read_text())
    meta["final_phase"].update(final_phase)
    (copy / "clients" / "meta.json").write_text(json.dumps(meta))
    return copy


@pytest.mark.parametrize("mixer", ["router", "instance"])
def test_input_dependent_mixer_is_refused_by_name(runs: dict[str, Path], tmp_path: Path, mixer: str) -> None:
    run = _copy_with_meta(runs["fedtreelora"], tmp_path, mixer=mixer)
    with pytest.raises(ExportError, match=f"'{mixer}' mixer.*not one LoRA"):
        export_client(run, 0, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_feddpa_instance_wise_inference_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    """FedDPA trains with a fixed mix but evaluates instance-wise (``feddpa.inference: instance``)."""
    run = _copy_with_meta(runs["fedit"], tmp_path, mixer="fixed", fixed_weights=[0.5, 0.5])
    meta = json.loads((run / "clients" / "meta.json").read_text())
    meta["method"] = "feddpa"
    (run / "clients" / "meta.json").write_text(json.dumps(meta))
    (run / "config.yaml").write_text("method: feddpa\nfeddpa:\n  inference: instance\n")
    with pytest.raises(ExportError, match="feddpa run mixes its experts with the 'instance' mixer"):
        export_client(run, 0, tmp_path / "adapter")


def test_warmup_only_run_exports_rank_r_and_has_no_trunk(runs: dict[str, Path], tmp_path: Path) -> None:
    run = _copy_with_meta(runs["fedtreelora"], tmp_path, name="warmup", mixer="single")
    adapter = export_client(run, 1, tmp_path / "adapter")
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8
    with pytest.raises(ExportError, match="warm-up"):
        export_trunk(run, tmp_path / "trunk")


def test_cli_export(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli_adapter"
    assert main(["export", str(runs["fedit"]), "--client", "1", "--out", str(out)]) == 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert main(["export", str(runs["fedit"]), "--trunk", "--out", str(tmp_path / "trunk")]) == 0
    assert main(["export", str(runs["fedit"]), "--out", str(tmp_path / "none")]) == 2
    assert "--client" in capsys.readouterr().err
    assert main(["export", str(runs["fedit"]), "--client", "7", "--out", str(tmp_path / "none")]) == 2
    assert "no client 7" in capsys.readouterr().err
