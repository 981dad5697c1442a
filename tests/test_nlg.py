"""Generation: instruction loaders, response-only loss, batched greedy decoding, ROUGE, the causal-LM
backbones, the nlg suites, and end-to-end runs on the real SmolLM2 (cut to 2 layers where speed matters)."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from fedtreelora.cli import main
from fedtreelora.config import ConfigError, load_config
from fedtreelora.data import (
    EVALS_NLG_DEFAULT,
    EVALS_TASKS,
    InstructionColumns,
    load_instructions,
    task_partition,
)
from fedtreelora.models import load_causal_lm, resolve_model_path
from fedtreelora.strategies import STRATEGIES
from fedtreelora.suites import load_suite
from fedtreelora.train.generation import (
    IGNORE_INDEX,
    collate_instructions,
    encode_instructions,
    generate,
    response_losses,
)
from fedtreelora.train.rouge import rouge_scores
from fedtreelora.train.settings import GenerationSettings

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def smollm2():  # type: ignore[no-untyped-def]
    return load_causal_lm("smollm2")


# ----------------------------------------------------------------------------------------------
# instruction data
# ----------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_records_load_with_optional_input_and_tasks(tmp_path: Path) -> None:
    rows = [
        {"instruction": f"Add one to {i}", "input": "" if i % 2 else f"n={i}", "output": str(i + 1), "category": "math"}
        for i in range(10)
    ] + [{"instruction": f"Echo {w}", "output": w, "category": "copy"} for w in "abcdefghij"]
    data = load_instructions(str(_write_jsonl(tmp_path / "flan.jsonl", rows)), validation_fraction=0.2)
    assert data.name == "flan" and data.task_names == ["math", "copy"]  # no task column: the category is the task
    assert len(data.train) == 16 and len(data.validation) == 4
    assert Counter(data.validation.tasks) == {"math": 2, "copy": 2}  # 20% of every task held out
    pairs = set(zip(data.train.instructions, data.train.outputs, strict=True))
    assert not pairs & set(zip(data.validation.instructions, data.validation.outputs, strict=True))
    merged = dict(
        zip(
            data.train.instructions + data.validation.instructions,
            data.train.inputs + data.validation.inputs,
            strict=True,
        )
    )
    assert merged["Add one to 2"] == "n=2" and merged["Add one to 3"] == "" and merged["Echo a"] == ""


def test_json_file_with_mapped_columns_and_a_task_filter(tmp_path: Path) -> None:
    rows = [
        {"prompt": f"q{i}", "context": "ctx", "answer": f"a{i}", "kind": "K", "job": f"t{i % 3}"} for i in range(30)
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(rows))  # a JSON list, as in the FedDPA/FedALT FLAN files
    columns = InstructionColumns(instruction="prompt", input="context", output="answer", category="kind", task="job")
    data = load_instructions(str(path), columns=columns, tasks=["t2", "t0"])
    assert data.task_names == ["t2", "t0"]
    assert set(data.train.tasks) | set(data.validation.tasks) == {"t0", "t2"}
    assert set(data.train.inputs) == {"ctx"} and set(data.train.categories) == {"K"}
    assert all(o == "a" + i[1:] for i, o in zip(data.train.instructions, data.train.outputs, strict=True))


def test_loader_errors_name_the_field_to_set(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "x.jsonl", [{"instruction": "i", "response": "r"}] * 3)
    with pytest.raises(ValueError, match=r"no column 'output' for data.output_column.*'response'"):
        load_instructions(str(path))
    with pytest.raises(ValueError, match=r"data.instruction_column"):
        load_instructions(str(path), columns=InstructionColumns(instruction="question", output="response"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        load_instructions(str(empty))
    with pytest.raises(ValueError, match=r"data.tasks: unknown evals task 'nope'"):
        load_instructions("evals-nlg", tasks=["nope"])
    with pytest.raises(ValueError, match=r"data.tasks names \['zz'\]"):
        load_instructions(str(path), columns=InstructionColumns(output="response"), tasks=["zz"])


def test_builtin_federation_has_two_tasks_per_category() -> None:
    data = load_instructions("evals-nlg")
    assert data.task_names == list(EVALS_NLG_DEFAULT)
    categories = Counter(data.task_category(t) for t in data.task_names)
    assert categories == {"Text Edit": 2, "Struct2Text": 2, "Sentiment": 2, "Reasoning": 2}
    for task in data.task_names:
        train = sum(t == task for t in data.train.tasks)
        test = sum(t == task for t in data.validation.tasks)
        assert train >= 64 and test >= 16, task  # the nlg suite's 64 / 16 per client fit every task
    assert all(data.train.outputs) and all(data.train.instructions)
    assert set(EVALS_NLG_DEFAULT) <= set(EVALS_TASKS)


def test_task_partition_gives_each_client_one_task() -> None:
    train = np.repeat(np.arange(3), 20)
    val = np.repeat(np.arange(3), 6)
    clients = task_partition(train, val, num_clients=6, n_train=8, n_val=3, seed=0)
    for c in clients:
        assert set(train[c.train_indices]) == {c.client % 3} and set(val[c.val_indices]) == {c.client % 3}
        assert c.train_label_counts.tolist() == [8 if t == c.client % 3 else 0 for t in range(3)]
    used = np.concatenate([c.train_indices for c in clients])
    assert len(set(used.tolist())) == used.size  # clients sharing a task get disjoint examples
    with pytest.raises(ValueError, match="data.num_clients=2 is smaller than the 3 tasks"):
        task_partition(train, val, num_clients=2, n_train=8, n_val=3, seed=0)
    with pytest.raises(ValueError, match="lower data.n_train"):
        task_partition(train, val, num_clients=6, n_train=11, n_val=3, seed=0)


# ----------------------------------------------------------------------------------------------
# prompts, masking, generation, ROUGE
# ----------------------------------------------------------------------------------------------


def test_only_response_tokens_carry_labels(smollm2) -> None:  # type: ignore[no-untyped-def]
    tok = smollm2.tokenizer
    enc = encode_instructions(tok, ["Reply with one word."], ["Hi"], ["hello"], max_length=128, max_new_tokens=16)
    ids, labels, prompt = enc.input_ids[0], enc.labels[0], enc.prompt_ids[0]
    n = len(prompt)
    assert ids[:n] == prompt and labels[:n] == [IGNORE_INDEX] * n
    # by hand: the chat template closes the answer with <|im_end|> and a newline, and those are learned too
    assert tok.decode(ids[n:]) == "hello<|im_end|>\n" and labels[n:] == ids[n:]
    assert tok.decode(prompt).endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert "Reply with one word." in tok.decode(prompt)  # the instruction is the system turn
    # the model's own loss with these labels is the mean over the response tokens only
    batch = collate_instructions(tok, [(enc, np.array([0]))])
    with torch.no_grad():
        out = smollm2.model(**batch)
    logits = out.logits[0, n - 1 : len(ids) - 1]
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[n:]))
    torch.testing.assert_close(out.loss, expected)
    # ... and the loss computed from the answer positions' logits alone is the same number
    summed, counted = response_losses(smollm2.model, batch)
    assert int(counted) == len(ids) - n
    torch.testing.assert_close(summed[0] / counted[0], expected, rtol=1e-4, atol=1e-4)  # BLAS order differs


def test_left_padding_does_not_change_a_rows_loss(smollm2) -> None:  # type: ignore[no-untyped-def]
    tok = smollm2.tokenizer
    enc = encode_instructions(
        tok, ["Say yes.", "Count to three, please, with commas."], ["", ""], ["yes", "1, 2, 3"], max_length=96,
        max_new_tokens=8,
    )  # fmt: skip
    with torch.no_grad():
        together = response_losses(smollm2.model, collate_instructions(tok, [(enc, np.array([0, 1]))]))
        alone = [response_losses(smollm2.model, collate_instructions(tok, [(enc, np.array([i]))])) for i in (0, 1)]
    torch.testing.assert_close(together[0], torch.cat([a[0] for a in alone]), rtol=1e-4, atol=1e-4)
    assert together[1].tolist() == [int(a[1]) for a in alone]


def test_alpaca_prompt_without_a_chat_template_ends_with_eos(smollm2) -> None:  # type: ignore[no-untyped-def]
    tok = smollm2.tokenizer
    template, tok.chat_template = tok.chat_template, None
    try:
        enc = encode_instructions(tok, ["Add."], ["1+1"], ["2"], max_length=128, max_new_tokens=8)
    finally:
        tok.chat_template = template
    prompt = tok.decode(enc.prompt_ids[0])
    assert "### Instruction:\nAdd.\n\n### Input:\n1+1\n\n### Response:\n" in prompt
    n = len(enc.prompt_ids[0])
    assert enc.labels[0][n:] == [*tok("2", add_special_tokens=False)["input_ids"], tok.eos_token_id]


def test_truncation_keeps_the_end_of_the_prompt_and_the_start_of_the_answer(smollm2) -> None:  # type: ignore[no-untyped-def]
    tok = smollm2.tokenizer
    long = " ".join(["word"] * 200)
    enc = encode_instructions(tok, ["Summarise."], [long], [long], max_length=64, max_new_tokens=10)
    assert len(enc.prompt_ids[0]) == 54 and len(enc.input_ids[0]) == 64
    assert tok.decode(enc.prompt_ids[0]).endswith("<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="model.max_length"):
        encode_instructions(tok, ["a"], [""], ["b"], max_length=16, max_new_tokens=16)


def test_left_padded_batch_generation_equals_one_prompt_at_a_time(smollm2) -> None:  # type: ignore[no-untyped-def]
    tok = smollm2.tokenizer
    enc = encode_instructions(
        tok,
        ["What is the capital of France?", "Translate to French: cat", "Name three colours, separated by commas."],
        ["", "", ""],
        ["", "", ""],
        max_length=96,
        max_new_tokens=12,
    )
    assert len({len(p) for p in enc.prompt_ids}) == 3, "prompts of different lengths, so padding matters"
    settings = GenerationSettings(max_new_tokens=12)
    together = generate(smollm2.model, tok, enc.prompt_ids, settings, CPU)
    alone = [generate(smollm2.model, tok, [p], settings, CPU)[0] for p in enc.prompt_ids]
    assert together == alone
    assert "Paris" in together[0]
    beams = generate(smollm2.model, tok, enc.prompt_ids[:1], GenerationSettings(max_new_tokens=12, num_beams=2), CPU)
    assert "Paris" in beams[0]


def test_rouge_matches_a_hand_computed_example() -> None:
    scores = rouge_scores(
        ["mat the on cat the", "Paris.", ""],
        ["the cat on the mat", "paris", "x"],
    )
    # pair 1: every unigram matches (R1 = 1); the longest common subsequence is 3 of 5 tokens (RL = 0.6)
    # pair 2: punctuation and case are ignored (R1 = RL = 1, exact match); pair 3: nothing generated
    assert scores["rouge1"] == pytest.approx((1.0 + 1.0 + 0.0) / 3)
    assert scores["rougeL"] == pytest.approx((0.6 + 1.0 + 0.0) / 3)
    assert scores["exact_match"] == pytest.approx(1 / 3)
    p, r = 5 / 6, 5 / 6  # "the cat sat on the mat" vs "the cat is on the mat": 5 of 6 unigrams shared
    assert rouge_scores(["the cat sat on the mat"], ["the cat is on the mat"])["rouge1"] == pytest.approx(
        2 * p * r / (p + r)
    )


# ----------------------------------------------------------------------------------------------
# backbones and configuration
# ----------------------------------------------------------------------------------------------


def test_smollm2_cache_is_a_plain_transformers_folder(tmp_path: Path) -> None:
    folder = Path(resolve_model_path("smollm2"))
    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and "quantization_config" not in config
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    cut = load_causal_lm("smollm2", num_layers=2)
    assert cut.model.config.num_hidden_layers == 2 and cut.task == "generation" and cut.head_modules == []
    cut.model.save_pretrained(tmp_path / "m")
    cut.tokenizer.save_pretrained(tmp_path / "m")
    again = load_causal_lm(str(tmp_path / "m"))  # any local path (or hub id) loads the same way
    ids = cut.tokenizer(["a short prompt"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(again.model(**ids).logits, cut.model(**ids).logits)


def test_quantization_needs_cuda_and_a_causal_lm() -> None:
    with pytest.raises(ValueError, match="needs a CUDA GPU.*model.quantization=none"):
        load_causal_lm("smollm2", num_layers=1, quantization="8bit", device="cpu")
    with pytest.raises(ConfigError, match="model.quantization applies to causal LMs"):
        load_config(overrides=["model.quantization=8bit"])
    with pytest.raises(ConfigError, match="generation.max_new_tokens"):
        load_config(overrides=["data.dataset=evals-nlg", "model.max_length=32", "generation.max_new_tokens=32"])


def test_generation_defaults_to_q_and_v_projections() -> None:
    assert load_config().model.target_modules == ["query", "value"]
    generation = load_config(overrides=["data.dataset=evals-nlg"])
    assert generation.data.resolved_task() == "generation" and generation.model.target_modules == ["q_proj", "v_proj"]
    assert load_config(overrides=["data.task=generation", "model.target_modules=[k_proj]"]).model.target_modules == [
        "k_proj"
    ]


@pytest.mark.parametrize("name", ["nlg-smoke", "nlg", "nlg-paper"])
def test_nlg_suites_resolve_for_every_method(name: str) -> None:
    suite = load_suite(name)
    configs = suite.validate()
    assert len(configs) == len(suite.datasets) * len(STRATEGIES)
    for config in configs:
        assert config.data.resolved_task() == "generation" and config.model.target_modules == ["q_proj", "v_proj"]
    first = configs[0]
    if name == "nlg-smoke":
        assert (first.model.name, first.model.num_layers, first.data.num_clients) == ("smollm2", 2, 4)
    if name == "nlg":
        assert (first.model.name, first.model.num_layers, first.data.num_clients) == ("smollm2", None, 8)
        assert first.model.rank == 8 and first.data.tasks is None  # the eight builtin tasks
    if name == "nlg-paper":
        assert (first.model.name, first.model.quantization) == ("meta-llama/Llama-2-7b-hf", "8bit")
        assert (first.model.rank, first.model.alpha, first.train.batch_size, first.train.lr) == (8, 32, 8, 3e-4)


def test_category_columns_average_their_clients() -> None:
    from fedtreelora.compare import RunResult, RunSpec, summarise, table_columns

    config = load_config(overrides=["data.dataset=evals-nlg"])
    summary = {
        "metric": "rouge1", "best_mean": 0.5, "final_mean": 0.4, "trainable_params_per_client": 10,
        "backbone_params": 100, "history": [], "client_categories": ["A", "A", "B", "B"],
        "per_client_best_round": [0.2, 0.4, 0.6, 0.8], "per_client": [0.1, 0.3, 0.5, 0.7],
    }  # fmt: skip
    runs = [RunResult(RunSpec("evals-nlg", "fedit", 1, config, Path("x")), summary, "new", 0.0)]
    columns = table_columns(runs, ["evals-nlg"])
    assert [c.label for c in columns] == ["A", "B"]
    (row,) = summarise(runs, ["evals-nlg"], ["fedit"], columns)
    assert (row["A_best_mean"], row["B_best_mean"], row["Average_best_mean"]) == pytest.approx((30.0, 70.0, 50.0))
    assert (row["A_final_mean"], row["B_final_mean"]) == pytest.approx((20.0, 60.0))


# ----------------------------------------------------------------------------------------------
# end to end
# ----------------------------------------------------------------------------------------------

TINY = [
    "data.dataset=evals-nlg",
    "data.tasks=[swap-words,date-to-string]",
    "data.num_clients=2",
    "data.n_train=8",
    "data.n_val=4",
    "model.name=smollm2",
    "model.num_layers=2",
    "model.max_length=64",
    "generation.max_new_tokens=6",
    "train.batch_size=4",
    "train.local_epochs=1",
    "federation.rounds=2",
    "logging.tensorboard=false",
]


@pytest.mark.slow
def test_clients_in_slots_equal_clients_one_at_a_time() -> None:
    from fedtreelora.engines import SimulationEngine

    runs = {}
    for per_pass in (1, 2):
        overrides = [*TINY, f"train.clients_per_pass={per_pass}", "train.lr=1e-2", "model.dropout=0.1"]
        config = load_config(overrides=overrides, method="fedit")  # dropout drawn per client in a pass too
        runs[per_pass] = SimulationEngine(config, quiet=True, report=False).run()
    a, b = runs[1], runs[2]
    assert a["metric"] == b["metric"] == "rouge1"
    for ha, hb in zip(a["history"], b["history"], strict=True):
        assert ha["mean_train_loss"] == pytest.approx(hb["mean_train_loss"], rel=1e-4)
    assert a["per_client"] == pytest.approx(b["per_client"], abs=1e-6)


@pytest.mark.slow
def test_a_few_local_steps_raise_rouge_on_a_real_task() -> None:
    """Full SmolLM2 on swap-words: answers go from chatty to the expected two words in quotes."""
    from fedtreelora.engines.setup import build_federation
    from fedtreelora.train import run_client_round
    from fedtreelora.train.metrics import evaluate_client

    config = load_config(
        overrides=[
            "data.dataset=evals-nlg",
            "data.tasks=[swap-words]",
            "data.num_clients=1",
            "data.n_train=32",
            "data.n_val=8",
            "model.name=smollm2",
            "model.max_length=96",
            "generation.max_new_tokens=16",
            "train.batch_size=8",
            "train.local_steps=8",  # ROUGE-1 +0.48 and loss -1.0 at seed 0 (+0.33, +0.23 at seeds 1, 2)
            "train.lr=3e-3",
        ],
        method="local",
    )
    fed = build_federation(config)
    tok = fed.classifier.tokenizer
    fed.bank.write_slot(0, fed.initial_state)
    fed.bank.configure(fed.strategy.phase(0))
    before = evaluate_client(fed.classifier.model, tok, fed.val_data[0], fed.settings, fed.device)
    result = run_client_round(
        fed.bank, tok, phase=fed.strategy.phase(0), state=fed.initial_state, payload={},
        upload_keys=[], train_data=fed.train_data[0], val_data=fed.val_data[0], settings=fed.settings,
        seed=0, device=fed.device,
    )  # fmt: skip
    after = result.metrics
    assert after["eval_loss"] < before["eval_loss"] - 0.3
    assert after["rouge1"] > before["rouge1"] + 0.2, (before, after)


@pytest.mark.slow
def test_nlg_smoke_compare_writes_a_per_category_table_with_every_method(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    # The suite as it is, on fewer and shorter examples: SmolLM2's 49k-word output layer over every
    # position is most of a run's time, and the table's plumbing does not depend on how many there are.
    smaller = ["data.n_train=2", "data.n_val=1", "model.max_length=40", "generation.max_new_tokens=4"]
    sets = [arg for assignment in smaller for arg in ("--set", assignment)]
    assert main(["compare", "--suite", "nlg-smoke", *sets, "--out", str(out), "--quiet"]) == 0
    suite = load_suite("nlg-smoke")
    methods = suite.default_methods()
    categories = ["Text Edit", "Struct2Text", "Sentiment", "Reasoning"]
    markdown = (out / "table.md").read_text()
    # one per-category table per round kind: best, best federated (after warm-up), final
    assert markdown.count(f"| method | {' | '.join(categories)} | Average |") == 3
    assert "ROUGE-1" in markdown
    for method in methods:
        assert f"| {method} |" in markdown
    with (out / "table.csv").open() as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert list(rows) == methods
    for method in methods:
        run = out / "runs" / "evals-nlg" / method / "seed1"
        summary = json.loads((run / "summary.json").read_text())
        assert summary["metric"] == "rouge1" and summary["client_categories"] == categories
        for prefix, per_client in (("best", "per_client_best_round"), ("final", "per_client")):
            values = [100.0 * v for v in summary[per_client]]
            for category, value in zip(categories, values, strict=True):  # one client per category here
                assert float(rows[method][f"{category}_{prefix}_mean"]) == pytest.approx(value)
            assert float(rows[method][f"Average_{prefix}_mean"]) == pytest.approx(np.mean(values))
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert len(records) == 2 * 4
        assert all(0.0 <= r["rouge1"] <= 1.0 and 0.0 <= r["rougeL"] <= 1.0 and "exact_match" in r for r in records)
        assert (run / "report.html").is_file()
    partitions = {(out / "runs" / "evals-nlg" / m / "seed1" / "partition.json").read_text() for m in methods}
    assert len(partitions) == 1
