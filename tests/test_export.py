"""Exported PEFT adapters give the same logits as the fedtreelora model they come from, and score what
the run scored.

Real runs (MiniLM cut to 2 layers, 4 clients, tiny data); the exported adapter is loaded with stock
``PeftModel.from_pretrained`` on a plain transformers backbone and compared with the run's own model
(``build_federation`` from the run's config.yaml, the client's state written into slot 0), and scored
on the client's validation split against the run's recorded ``received_accuracy`` / ``accuracy``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification
from transformers import logging as hf_logging

from fedtreelora.cli import main
from fedtreelora.config import load_config
from fedtreelora.engines import Federation, SimulationEngine, build_federation
from fedtreelora.engines.setup import client_seed
from fedtreelora.export import ExportError, export_client, export_trunk, trunk_layers
from fedtreelora.runfolder import RunFolder, trained_record
from fedtreelora.train.batches import EncodedExamples, eval_batches
from fedtreelora.train.received import evaluate_received

pytestmark = pytest.mark.slow

#: logits of the exported adapter and of the fedtreelora model agree to this (float32; seen: ~1e-7)
ATOL = 1e-5

TINY = [
    "model.num_layers=2",
    "data.num_clients=4",
    "data.n_train=32",
    "data.n_val=16",
    "train.batch_size=16",
    "federation.rounds=2",  # ends in a federated round; the sharpness checks below hold with margin (2.7x and up)
    "fedtreelora.warmup_rounds=1",
    "fedtreelora.tau=-1",  # every layer leaves the root: every client has a non-zero external expert
]


class KeepingEngine(SimulationEngine):
    """The in-process engine, keeping its federation so that a test can ask the server, after the run,
    what it sends each client."""

    fed: Federation

    def build_federation(self) -> Federation:
        self.fed = super().build_federation()
        return self.fed


#: label -> (method, overrides beyond TINY): one run per method family
RUNS: dict[str, tuple[str, list[str]]] = {
    "fedtreelora": ("fedtreelora", ["model.head=local"]),  # client-local heads
    "fedit": ("fedit", []),  # the shared frozen head
    "personal": ("fedtreelora", ["fedtreelora.personal=true"]),
    "fedsa": ("fedsa", []),
    "fedalt": ("fedalt", []),
    "feddpa": ("feddpa", ["feddpa.inference=fixed"]),  # instance-wise inference is no single LoRA
    "fedlease": ("fedlease", ["fedlease.warmup_rounds=1", "fedlease.router_sharing=local"]),
}

#: each run's federation as the engine left it (its strategy holds the server's last payloads)
_SERVERS: dict[Path, Federation] = {}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One finished run per entry of :data:`RUNS`."""
    out = {}
    for label, (method, extra) in RUNS.items():
        folder = tmp_path_factory.mktemp(label)
        engine = KeepingEngine(load_config(overrides=TINY + extra, method=method), folder, quiet=True, report=False)
        engine.run()
        _SERVERS[folder] = engine.fed
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
    """(batch, labels) logits of the fedtreelora model holding ``state`` in the phase after the run's
    last round (that of its received models; in these runs the same as the last round's)."""
    fed.bank.write_slot(0, state)
    fed.bank.configure(fed.strategy.phase(fed.config.federation.rounds))
    model = fed.classifier.model.eval()
    with torch.no_grad():
        return model(**inputs).logits.float()


def peft_model(minilm_path: str, adapter: Path) -> PeftModel:
    """Stock peft loading the adapter onto a plain MiniLM with the run's layer count, in eval mode."""
    info = json.loads((adapter / "fedtreelora_export.json").read_text())
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the plain backbone's fresh head is reported; the adapter replaces it
    try:
        base = AutoModelForSequenceClassification.from_pretrained(
            minilm_path, num_labels=info["num_labels"], num_hidden_layers=info["num_hidden_layers"]
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    return PeftModel.from_pretrained(base, str(adapter)).eval()


def peft_logits(minilm_path: str, adapter: Path, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """(batch, labels) logits of stock peft loading the adapter onto a plain 2-layer MiniLM."""
    with torch.no_grad():
        return peft_model(minilm_path, adapter)(**inputs).logits.float()


def peft_scores(minilm_path: str, adapter: Path, run_dir: Path, client: int) -> dict[str, float]:
    """Accuracy and mean cross-entropy of the exported adapter, loaded by stock peft, on client
    ``client``'s validation split (the run's examples, tokenized as the run tokenized them)."""
    fed = federation(run_dir)
    data = fed.val_data[client]
    assert isinstance(data, EncodedExamples)
    model = peft_model(minilm_path, adapter)
    correct, loss = 0, 0.0
    with torch.no_grad():
        for batch in eval_batches(fed.classifier.tokenizer, data, 16):
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            correct += int((logits.argmax(-1) == labels).sum())
            loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
    return {"accuracy": correct / len(data), "eval_loss": loss / len(data)}


def final_row(run_dir: Path, client: int) -> dict[str, Any]:
    """Client ``client``'s record of the run's last round (metrics.jsonl; a score-only record when it sat
    that round out)."""
    rows = [r for r in RunFolder(run_dir).read_metrics() if r["client"] == client]
    return max(rows, key=lambda r: r["round"])


def sigmoid_logits(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.sigmoid(torch.stack([v for k, v in state.items() if k.endswith(".mix_logit")]))


def test_fedtreelora_client_exports_as_one_rank_2r_lora(
    runs: dict[str, Path], minilm_path: str, tmp_path: Path
) -> None:
    run = runs["fedtreelora"]
    states = [RunFolder(run).client_state(k, "received") for k in range(4)]
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
    state = RunFolder(run).client_state(1, "received")
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
    expected = run_logits(fed, RunFolder(run).client_state(2, "received"), inputs)
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


def _copy_with_meta(run: Path, tmp_path: Path, **phase: object) -> Path:
    """A copy of the run's clients and summary whose recorded phases (trained and received) are changed."""
    copy = tmp_path / "run"
    shutil.copytree(run / "clients", copy / "clients")
    shutil.copy(run / "summary.json", copy / "summary.json")
    meta = json.loads((copy / "clients" / "meta.json").read_text())
    meta["final_phase"].update(phase)
    meta["received_phase"].update(phase)
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
    trained = tmp_path / "trained"
    assert main(["export", str(runs["fedit"]), "--client", "1", "--model", "trained", "--out", str(trained)]) == 0
    assert json.loads((trained / "fedtreelora_export.json").read_text())["model"] == "trained"
    assert json.loads((out / "fedtreelora_export.json").read_text())["model"] == "received", "the default"
    assert main(["export", str(runs["fedit"]), "--trunk", "--model", "trained", "--out", str(tmp_path / "t")]) == 2


# --- what is scored is what is kept -------------------------------------------------------------------------
#: per run: key fragments of the client's own part (kept in the received model) and of the shared part
#: (replaced by the server's payload). Keys matching neither are mixer tensors the method does not use.
PARTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "fedit": ((), (".shared.lora_A", ".shared.lora_B")),
    "fedsa": ((".shared.lora_B",), (".shared.lora_A",)),
    "fedalt": ((".individual.", ".router"), (".rest.",)),
    "feddpa": ((".local.",), (".global.",)),
    "fedtreelora": ((".mix_logit", "classifier."), (".cluster.", ".external.")),
    "personal": ((".mix_logit", ".personal."), (".cluster.", ".external.")),
    "fedlease": ((".topm_router",), (".own.", ".other_", ".expert_mask")),
}


@pytest.mark.parametrize("label", list(PARTS))
def test_received_model_keeps_the_clients_part_and_takes_the_servers(runs: dict[str, Path], label: str) -> None:
    """The saved received model is the kept state with exactly the server's payload in place: the
    client's own tensors bitwise its kept ones, the shared ones bitwise what the server sends; and
    scored as the run scores received models, it gives the run's ``received_accuracy``."""
    run, fed = runs[label], _SERVERS[runs[label]]
    folder = RunFolder(run)
    own, shared = PARTS[label]
    rounds = fed.config.federation.rounds
    assert folder.saved_clients("received") == folder.saved_clients("trained") == [0, 1, 2, 3]
    for k in range(4):
        kept, received = folder.client_state(k, "trained"), folder.client_state(k, "received")
        payload = fed.strategy.payload(rounds, k)
        assert received.keys() == kept.keys()
        sent = {key for key in kept if any(f in key for f in shared)}
        if label == "fedlease":  # the server fills only the slots of the M experts that exist
            in_use = ("own", *(f"other_{j}" for j in range(1, fed.strategy.num_clusters)))
            sent = {key for key in sent if key.endswith(".expert_mask") or key.rsplit(".", 2)[-2] in in_use}
        assert set(payload) == sent, "the server sends the shared part"
        mine = {key for key in kept if any(f in key for f in own)}
        assert bool(mine) == bool(own) and not mine & set(payload), "the client's own part is never sent to it"
        for key in kept:
            assert received[key].equal(payload.get(key, kept[key])), (k, key)
        assert any(not received[key].equal(kept[key]) for key in payload), "the shared part was replaced"
        row = final_row(run, k)
        scores = evaluate_received(
            fed.bank, fed.classifier.tokenizer, phase=fed.strategy.phase(rounds), state=received, payload={},
            train_data=fed.train_data[k], val_data=fed.val_data[k], settings=fed.settings,
            seed=client_seed(fed.config.seed, rounds - 1, k), device=fed.device,
        )  # fmt: skip
        assert (scores["accuracy"], scores["eval_loss"]) == (row["received_accuracy"], row["received_eval_loss"])


EXPORTABLE = ["fedit", "fedsa", "feddpa", "fedtreelora", "personal"]


@pytest.mark.parametrize("model", ["received", "trained"])
@pytest.mark.parametrize("label", EXPORTABLE)
def test_exported_client_scores_what_the_run_scored(
    runs: dict[str, Path], minilm_path: str, tmp_path: Path, label: str, model: str
) -> None:
    """Stock peft with the exported adapter, on client 0's validation split, scores the run's final
    ``received_accuracy`` (``--model received``, the default) or ``accuracy`` (``--model trained``)."""
    run = runs[label]
    row = final_row(run, 0)
    assert abs(row["received_eval_loss"] - row["eval_loss"]) > 1e-3, "the two models differ: the test is sharp"
    adapter = export_client(run, 0, tmp_path / "adapter", **({} if model == "received" else {"model": model}))
    info = json.loads((adapter / "fedtreelora_export.json").read_text())
    assert (info["model"], info["phase"]) == (model, "federated")
    scores = peft_scores(minilm_path, adapter, run, 0)
    prefix = "received_" if model == "received" else ""
    assert scores["accuracy"] == row[f"{prefix}accuracy"]
    assert scores["eval_loss"] == pytest.approx(row[f"{prefix}eval_loss"], abs=1e-5)


@pytest.mark.parametrize(("label", "mixer"), [("fedalt", "router"), ("fedlease", "topm")])
@pytest.mark.parametrize("model", ["received", "trained"])
def test_a_router_run_is_refused_for_either_model(
    runs: dict[str, Path], tmp_path: Path, label: str, mixer: str, model: str
) -> None:
    with pytest.raises(ExportError, match=f"'{mixer}' mixer"):
        export_client(runs[label], 0, tmp_path / "adapter", model=model)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def partial(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Federation]:
    """FedTreeLoRA with two warm-up rounds of four and half the clients per round: at seed 0 client 0
    trains in round 0 only, client 1 last in round 1 (the last warm-up round)."""
    folder = tmp_path_factory.mktemp("partial")
    overrides = [*TINY, "federation.rounds=4", "federation.fraction_train=0.5", "fedtreelora.warmup_rounds=2"]
    engine = KeepingEngine(load_config(overrides=overrides, method="fedtreelora"), folder, quiet=True, report=False)
    engine.run()
    return folder, engine.fed


def test_a_client_that_sat_out_is_scored_and_saved_on_what_the_server_would_send_it(
    partial: tuple[Path, Federation], minilm_path: str, tmp_path: Path
) -> None:
    """Every client is scored after every round on what it would receive, sampled or not: a client absent
    from the last rounds is scored, saved and exported on its kept state plus the server's final payload
    for it, in the final phase, and its trained model stays the one it last trained, in that round's
    phase. Client 0 last trained in warm-up round 0, client 1 in round 1 (the last warm-up round); both
    receive the tree's experts."""
    run, fed = partial
    folder = RunFolder(run)
    rows = folder.read_metrics()
    assert sorted((r["round"], r["client"]) for r in rows) == [(r, k) for r in range(4) for k in range(4)]
    last = {k: max(r["round"] for r in rows if r["client"] == k and trained_record(r)) for k in range(4)}
    assert last == {0: 0, 1: 1, 2: 3, 3: 3}, "the participation this test is about"
    meta = folder.read_client_meta()
    assert meta is not None
    assert (meta["received_phase"]["name"], meta["received_phase"]["mixer"]) == ("federated", "lambda")
    assert "received_phase_of_client" not in meta, "every client was scored in the final phase"
    rounds = fed.config.federation.rounds
    for k in (0, 1):
        received, trained = folder.client_state(k, "received"), folder.client_state(k, "trained")
        final = {**trained, **fed.strategy.payload(rounds, k)}
        assert received.keys() == final.keys() and all(received[key].equal(final[key]) for key in received)
        assert any(not received[key].equal(trained[key]) for key in received), "the shared part was replaced"
        row = final_row(run, k)
        assert (row["round"], row["trained"]) == (rounds - 1, False) and "accuracy" not in row
        scores = evaluate_received(
            fed.bank, fed.classifier.tokenizer, phase=fed.strategy.phase(rounds), state=received, payload={},
            train_data=fed.train_data[k], val_data=fed.val_data[k], settings=fed.settings,
            seed=client_seed(fed.config.seed, rounds - 1, k), device=fed.device,
        )  # fmt: skip
        assert (scores["accuracy"], scores["eval_loss"]) == (row["received_accuracy"], row["received_eval_loss"])
        trained_row = next(r for r in rows if (r["round"], r["client"]) == (last[k], k))
        for model, r, prefix, scored in (("received", 16, "received_", row), ("trained", 8, "", trained_row)):
            adapter = export_client(run, k, tmp_path / f"{k}-{model}", model=model)  # type: ignore[arg-type]
            assert json.loads((adapter / "adapter_config.json").read_text())["r"] == r, (k, model)
            exported = peft_scores(minilm_path, adapter, run, k)
            assert exported["accuracy"] == scored[f"{prefix}accuracy"], (k, model)
            assert exported["eval_loss"] == pytest.approx(scored[f"{prefix}eval_loss"], abs=1e-5), (k, model)


def test_a_run_folder_without_received_models_names_the_fix(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run folder written before received models were kept: the default export says what to do, and
    the trained model still exports."""
    old = tmp_path / "old"
    shutil.copytree(runs["fedit"], old)
    shutil.rmtree(old / "clients" / "received")
    meta = json.loads((old / "clients" / "meta.json").read_text())
    del meta["received_phase"]
    (old / "clients" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="holds no received models.*--model trained"):
        export_client(old, 0, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    assert main(["export", str(old), "--client", "0", "--out", str(tmp_path / "cli")]) == 2
    assert "--model trained" in capsys.readouterr().err
    assert main(["export", str(old), "--client", "0", "--model", "trained", "--out", str(tmp_path / "cli")]) == 0
    assert json.loads((tmp_path / "cli" / "fedtreelora_export.json").read_text())["model"] == "trained"
