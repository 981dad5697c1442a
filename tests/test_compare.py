"""`fedtreelora compare` and the benchmark suites: every suite validates; the smoke suite runs every
registered method on the same partitions, its tables match the runs, finished runs are reused, and a
changed setting is run again."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from fedtreelora.cli import main
from fedtreelora.compare import (
    ARI_RULE,
    ARI_TITLE,
    AVERAGE,
    MARK_RULE,
    Column,
    RunResult,
    RunSpec,
    _read_summary,
    _source,
    ari_tables,
    csv_columns,
    difference_values,
    majority_rate,
    mean_std,
    paired_tables,
    plan_runs,
    read_partitions,
    render_markdown,
    run_compare,
    summarise,
    table_columns,
    write_outputs,
)
from fedtreelora.config import ConfigError, ExperimentConfig, load_config
from fedtreelora.runfolder import RunFolder, RunSummary
from fedtreelora.strategies import STRATEGIES
from fedtreelora.suites import PACKAGED_SUITES, Suite, available_suites, find_suite, load_suite, order_methods

SUITES = ("nlu-smoke", "nlu", "nlu-paper")


# ----------------------------------------------------------------------------------------------
# suites (no model is loaded)
# ----------------------------------------------------------------------------------------------


def test_one_method_order_from_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    """Rows follow the paper (reference points, baselines, FedTreeLoRA last); a suite's variants and
    unregistered names come after the baselines, by name; docs and suites use the same order."""
    got = order_methods(["tau-0.1", "fedtreelora", "fedlease", "local", "fedit", "auto", "fedit"])
    assert got == ["local", "fedit", "fedlease", "auto", "tau-0.1", "fedtreelora"]
    order = order_methods(list(STRATEGIES))
    assert order[:2] == ["local", "fedit"] and order[-1] == "fedtreelora"
    from fedtreelora.docgen import methods_reference

    page = methods_reference()
    assert sorted(order, key=lambda name: page.index(f"## `{name}`")) == order
    from fedtreelora.cli import main

    assert main(["methods"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == order


@pytest.mark.parametrize("name", SUITES)
def test_every_suite_resolves_to_valid_configs_for_every_method(name: str) -> None:
    suite = load_suite(name)
    assert suite.path == PACKAGED_SUITES / f"{name}.yaml" and suite.name == name and suite.description
    assert suite.default_methods() == order_methods(list(STRATEGIES)), "methods: all means every registered one"
    configs = suite.validate()  # every (dataset, method) validates; data sections agree across methods
    assert len(configs) == len(suite.datasets) * len(STRATEGIES)
    for seed in suite.seeds:
        specs = plan_runs(suite, "/nonexistent", seeds=[seed])
        assert len(specs) == len(suite.datasets) * len(STRATEGIES)
        assert {s.config.seed for s in specs} == {seed}
    for config in configs:
        assert config.model.rank == 4 and config.model.alpha == 16 and config.model.dropout == 0.05
        assert config.model.target_modules == ["query", "value"]
        options = config.method_options()
        field = type(options).model_fields.get("warmup_rounds")
        if field is not None and field.default:  # the methods that warm up by default
            assert options.warmup_rounds == suite.warmup_rounds < config.federation.rounds
        elif field is not None:  # FedIT and its kin stay FedAvg from round 1, as in the papers
            assert options.warmup_rounds == 0


def test_suite_protocols() -> None:
    smoke = load_suite("nlu-smoke")
    assert smoke.seeds == (1,)
    for config in smoke.validate():
        assert (config.model.num_layers, config.data.num_clients, config.federation.rounds) == (2, 4, 3)

    nlu = load_suite("nlu")
    assert list(nlu.datasets) == ["sarcasm", "corr2cause", "tweets", "bbc"] and nlu.seeds == (1, 2, 3)
    by_dataset = {c.data.dataset: c for c in nlu.validate(["fedtreelora"])}
    assert set(by_dataset) == set(nlu.datasets)
    for config in by_dataset.values():
        assert config.model.name == "minilm" and config.model.num_layers is None
        assert (config.data.num_clients, config.data.dirichlet_alpha) == (20, 0.5)
        assert (config.federation.rounds, config.fedtreelora.warmup_rounds) == (15, 3)
    assert {d: c.model.max_length for d, c in by_dataset.items()} == {
        "sarcasm": 64,
        "corr2cause": 128,
        "tweets": 64,
        "bbc": 128,
    }
    # 20 clients fit the de-duplicated pools (train / validation): corr2cause 1,218 / 304, bbc 1,701 / 426
    assert 20 * by_dataset["corr2cause"].data.n_train <= 1218 and 20 * by_dataset["corr2cause"].data.n_val <= 304
    assert 20 * by_dataset["bbc"].data.n_train <= 1701 and 20 * by_dataset["bbc"].data.n_val <= 426

    paper = load_suite("nlu-paper")
    assert list(paper.datasets) == ["mnli", "qnli", "sst2", "qqp"] and paper.seeds == (1, 2, 3)
    columns = {}
    for config in paper.validate(["fedtreelora"]):
        assert config.model.name == "roberta-large" and config.model.max_length == 128
        assert (config.data.dataset, config.data.num_clients, config.data.n_train) == ("glue", 20, 1000)
        assert (config.train.batch_size, config.train.local_epochs) == (128, 2)
        assert (config.federation.rounds, config.fedtreelora.warmup_rounds) == (25, 5)
        columns[config.data.hub_config] = (config.data.text_column, config.data.text_pair_column)
    assert columns == {
        "mnli": ("premise", "hypothesis"),
        "qnli": ("question", "sentence"),
        "sst2": ("sentence", None),
        "qqp": ("question1", "question2"),
    }


def test_suite_lookup_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(SUITES) <= set(available_suites())
    with pytest.raises(ConfigError, match="available suites: .*nlu-smoke"):
        find_suite("nlu-smok")
    own = tmp_path / "mine.yaml"
    own.write_text("name: mine\ndatasets: {s: {data: {dataset: sarcasm}}}\nbase: {data: {num_clients: 3}}\n")
    assert find_suite(own) == own and load_suite(str(own)).name == "mine"
    # a project-local ./configs/suites/NAME.yaml shadows the packaged suite of that name
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs" / "suites").mkdir(parents=True)
    (tmp_path / "configs" / "suites" / "nlu-smoke.yaml").write_text(own.read_text())
    assert load_suite("nlu-smoke").name == "mine"

    base = {"name": "x", "datasets": {"s": {"data": {"dataset": "sarcasm"}}}}
    with pytest.raises(ConfigError, match="same partition"):
        Suite.from_dict({**base, "method_overrides": {"fedit": {"data": {"n_train": 8}}}})
    with pytest.raises(ConfigError, match="colour"):
        Suite.from_dict({**base, "colour": "red"})
    with pytest.raises(ConfigError, match="Average"):
        Suite.from_dict({**base, "datasets": {"average": {}}})
    suite = Suite.from_dict(base)
    with pytest.raises(ConfigError, match="data.nclients"):
        suite.resolve("fedit", "s", 1, ["data.nclients=3"])
    with pytest.raises(ConfigError, match="unknown method"):
        plan_runs(suite, tmp_path, methods=["fedavgx"])
    with pytest.raises(ConfigError, match="unknown dataset"):
        plan_runs(suite, tmp_path, datasets=["tweets"])
    overridden = Suite.from_dict({**base, "method_overrides": {"fedit": {"train": {"lr": 0.01}}}})
    specs = {s.method: s.config for s in plan_runs(overridden, tmp_path, methods=["fedit", "local"])}
    assert (specs["fedit"].train.lr, specs["local"].train.lr) == (0.01, 5e-3)


def test_mean_std_convention() -> None:
    assert mean_std([70.0]) == (70.0, 0.0)
    mean, std = mean_std([70.0, 74.0, 72.0])
    assert mean == pytest.approx(72.0) and std == pytest.approx(2.0)  # sample std, ddof=1


def test_majority_rate_is_the_mean_share_of_each_clients_commonest_label() -> None:
    partition = {"clients": [{"val_label_counts": [3, 1]}, {"val_label_counts": [1, 1]}, {"val_label_counts": [0, 0]}]}
    assert majority_rate(partition) == pytest.approx((0.75 + 0.5) / 2)  # a client without validation data is left out


# ----------------------------------------------------------------------------------------------
# paired differences (fake runs, nothing trains)
# ----------------------------------------------------------------------------------------------

FEDIT_BEST = [0.75, 0.72, 0.80]
TREE_BEST = [0.80, 0.70, 0.90]  # differences to FedIT: [5, -2, 10] points
STEADY_BEST = [0.80, 0.81, 0.82]  # differences to FedIT: [5, 9, 2] points
LOCAL_BEST = [0.70, 0.70, 0.70]
SEEDS = (1, 2, 3)


@pytest.fixture(scope="module")
def config() -> ExperimentConfig:
    return load_config()


def _hand_mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _fake_runs(
    config: ExperimentConfig,
    best: dict[str, list[float]],
    datasets: tuple[str, ...] = ("sarcasm",),
    folder: Path = Path("x"),
) -> list[RunResult]:
    """One run per (method, dataset, seed): best-round score as given (the same on every dataset), final
    round 0.1 below it."""
    runs = []
    for method, scores in best.items():
        for dataset in datasets:
            for seed, score in zip(SEEDS, scores, strict=True):
                summary = {
                    "best_mean": score, "final_mean": score - 0.1, "metric": "accuracy", "evaluate": "received",
                    "trainable_params_per_client": 10, "backbone_params": 1000, "history": [],
                }  # fmt: skip
                spec = RunSpec(dataset, method, seed, config, folder / dataset / method / f"seed{seed}")
                runs.append(RunResult(spec, summary, "reused", 0.0))
    return runs


def _meta(runs: list[RunResult], paired: dict) -> dict:
    return {
        "suite": "fake", "sources": {"sarcasm": "sarcasm", "tweets": "tweets"}, "seeds": list(SEEDS),
        "command": "fedtreelora compare --suite fake", "machine": "here", "finished": "now",
        "metric": "accuracy", "evaluate": "received", "paired_differences": paired,
    }  # fmt: skip


def _add_differences(rows: list[dict], tables: dict) -> None:
    for row in rows:
        row.update(difference_values(tables, row["method"]))


def test_paired_differences_match_hand_computed_numbers(config: ExperimentConfig) -> None:
    methods = ["local", "fedit", "fedtreelora", "steady"]
    runs = _fake_runs(
        config, {"local": LOCAL_BEST, "fedit": FEDIT_BEST, "fedtreelora": TREE_BEST, "steady": STEADY_BEST}
    )
    tables = paired_tables(runs, methods, [Column("sarcasm", "sarcasm")])
    assert list(tables) == ["fedit", "local"]
    fedit = tables["fedit"]
    assert fedit["excluded"] == []
    cell = fedit["best"]["fedtreelora"]["sarcasm"]
    assert cell["differences"] == pytest.approx([5.0, -2.0, 10.0]) and cell["seeds"] == [1, 2, 3]
    mean, std = _hand_mean_std([5.0, -2.0, 10.0])
    assert (cell["mean"], cell["std"], cell["n"]) == (pytest.approx(13 / 3), pytest.approx(std), 3)
    assert std == pytest.approx(math.sqrt(109 / 3))  # sample std (ddof=1), as mean_std
    assert mean_std(cell["differences"])[1] == pytest.approx(std)
    assert not cell["marked"]  # 4.33 < 2 * 6.03 / sqrt(3) = 6.96
    steady = fedit["best"]["steady"]["sarcasm"]
    assert steady["mean"] == pytest.approx(16 / 3) and steady["std"] == pytest.approx(math.sqrt(37 / 3))
    assert steady["marked"]  # 5.33 > 2 * 3.51 / sqrt(3) = 4.06
    # the final round is scored separately (here 0.1 below every best round: the same differences)
    assert fedit["final"]["fedtreelora"]["sarcasm"]["differences"] == pytest.approx([5.0, -2.0, 10.0])
    own = fedit["best"]["fedit"]["sarcasm"]
    assert (own["mean"], own["std"], own["n"], own["marked"]) == (0.0, 0.0, 3, False)
    assert fedit["best"]["fedtreelora"][AVERAGE]["differences"] == pytest.approx([5.0, -2.0, 10.0])
    assert tables["local"]["best"]["fedit"]["sarcasm"]["differences"] == pytest.approx([5.0, 2.0, 10.0])


def test_a_missing_seed_reduces_n_and_the_average_pairs_complete_seeds(config: ExperimentConfig) -> None:
    runs = _fake_runs(config, {"fedit": FEDIT_BEST, "fedtreelora": TREE_BEST}, ("sarcasm", "tweets"))
    runs = [r for r in runs if (r.spec.method, r.spec.dataset, r.spec.seed) != ("fedtreelora", "tweets", 3)]
    columns = [Column("sarcasm", "sarcasm"), Column("tweets", "tweets")]
    cells = paired_tables(runs, ["fedit", "fedtreelora"], columns)["fedit"]["best"]["fedtreelora"]
    assert cells["sarcasm"]["n"] == 3 and cells["tweets"]["n"] == 2
    assert cells["tweets"]["differences"] == pytest.approx([5.0, -2.0]) and cells["tweets"]["seeds"] == [1, 2]
    assert cells[AVERAGE]["seeds"] == [1, 2] and cells[AVERAGE]["mean"] == pytest.approx(1.5)


def test_a_partition_mismatch_excludes_the_pair_and_says_so(config: ExperimentConfig, tmp_path: Path) -> None:
    runs = _fake_runs(config, {"fedit": FEDIT_BEST, "fedtreelora": TREE_BEST}, folder=tmp_path)
    for r in runs:
        r.spec.folder.mkdir(parents=True)
        odd = (r.spec.method, r.spec.seed) == ("fedtreelora", 2)
        (r.spec.folder / "partition.json").write_text('{"clients": [2]}' if odd else '{"clients": [1]}')
    partitions = read_partitions(runs)
    assert partitions[("fedtreelora", "sarcasm", 2)] != partitions[("fedit", "sarcasm", 2)]
    columns = [Column("sarcasm", "sarcasm")]
    tables = paired_tables(runs, ["fedit", "fedtreelora"], columns, partitions)
    assert tables["fedit"]["excluded"] == [{"method": "fedtreelora", "dataset": "sarcasm", "seed": 2}]
    cell = tables["fedit"]["best"]["fedtreelora"]["sarcasm"]
    assert cell["seeds"] == [1, 3] and cell["differences"] == pytest.approx([5.0, 10.0]) and cell["n"] == 2
    rows = summarise(runs, ["sarcasm"], ["fedit", "fedtreelora"], columns)
    markdown = render_markdown(rows, ["sarcasm"], _meta(runs, tables))
    assert "paired" not in markdown.lower()  # rows without differences: no section
    _add_differences(rows, tables)
    markdown = render_markdown(rows, ["sarcasm"], _meta(runs, tables))
    assert "Left out (the run's partition differs from FedIT's at the same seed): fedtreelora on sarcasm seed 2." in (
        markdown
    )


def test_paired_sections_in_table_md_and_csv(config: ExperimentConfig, tmp_path: Path) -> None:
    methods = ["local", "fedit", "fedtreelora", "steady"]
    runs = _fake_runs(
        config, {"local": LOCAL_BEST, "fedit": FEDIT_BEST, "fedtreelora": TREE_BEST, "steady": STEADY_BEST}
    )
    columns = [Column("sarcasm", "sarcasm")]
    tables = paired_tables(runs, methods, columns)
    rows = summarise(runs, ["sarcasm"], methods, columns)
    _add_differences(rows, tables)
    files = write_outputs(tmp_path, rows, runs, ["sarcasm"], _meta(runs, tables), ["sarcasm"], list(tables))
    markdown = files["table.md"].read_text()
    assert markdown.index("## Cost") < markdown.index("## Paired differences to FedIT")
    assert markdown.index("## Paired differences to FedIT") < markdown.index("## Paired differences to local")
    assert markdown.count(MARK_RULE) == 6  # under each of best / best federated / final round, for each reference
    assert "| method − FedIT | sarcasm | Average |" in markdown
    assert "| fedit | — | — |" in markdown
    assert "| fedtreelora | +4.33 ± 6.03 (n=3) | +4.33 ± 6.03 (n=3) |" in markdown
    assert "| steady | +5.33 ± 3.51 (n=3)* | +5.33 ± 3.51 (n=3)* |" in markdown
    assert "| local | -5.67 ± 4.04 (n=3)* |" in markdown  # [-5, -2, -10] against FedIT
    assert markdown.count("| method | sarcasm | Average |") == 3  # the main tables keep their header
    with files["table.csv"].open() as f:
        csv_rows = {r["method"]: r for r in csv.DictReader(f)}
    assert list(next(iter(csv_rows.values()))) == csv_columns(["sarcasm"], ["fedit", "local"])
    tree = csv_rows["fedtreelora"]
    assert float(tree["diff_fedit_sarcasm_best_mean"]) == pytest.approx(13 / 3)
    assert float(tree["diff_fedit_sarcasm_best_std"]) == pytest.approx(math.sqrt(109 / 3))
    assert int(tree["diff_fedit_sarcasm_best_n"]) == 3
    assert float(tree["diff_local_sarcasm_final_mean"]) == pytest.approx(100 * (0.8 + 0.7 + 0.9 - 2.1) / 3)
    record = json.loads(files["compare.json"].read_text())
    assert record["paired_differences"]["fedit"]["best"]["fedtreelora"]["sarcasm"]["seeds"] == [1, 2, 3]


def test_an_absent_reference_gives_no_section(config: ExperimentConfig, tmp_path: Path) -> None:
    methods = ["fedit", "fedtreelora"]
    runs = _fake_runs(config, {"fedit": FEDIT_BEST, "fedtreelora": TREE_BEST})
    columns = [Column("sarcasm", "sarcasm")]
    tables = paired_tables(runs, methods, columns)
    assert list(tables) == ["fedit"]
    assert paired_tables(runs, ["fedtreelora"], columns) == {}
    rows = summarise(runs, ["sarcasm"], methods, columns)
    _add_differences(rows, tables)
    files = write_outputs(tmp_path, rows, runs, ["sarcasm"], _meta(runs, tables), ["sarcasm"], list(tables))
    markdown = files["table.md"].read_text()
    assert "## Paired differences to FedIT" in markdown and "to local" not in markdown
    header = files["table.csv"].read_text().splitlines()[0]
    assert "diff_fedit_sarcasm_best_mean" in header and "diff_local" not in header


# ----------------------------------------------------------------------------------------------
# the best federated round (fake runs, nothing trains)
# ----------------------------------------------------------------------------------------------

#: per method, the round means of seeds 1-3: two warm-up rounds, then three federated ones
WARM_HISTORIES = {
    "fedtreelora": [[0.82, 0.60, 0.70, 0.74, 0.73], [0.80, 0.61, 0.71, 0.76, 0.75], [0.84, 0.62, 0.72, 0.70, 0.78]],
    "fedit": [[0.70, 0.71, 0.72, 0.73, 0.74]] * 3,
}


def _warm_runs(config: ExperimentConfig, folder: Path) -> list[RunResult]:
    """Runs whose summaries are written as before the best federated round was recorded; FedTreeLoRA's
    best round is warm-up round 1 on every seed."""
    runs = []
    for method, per_seed in WARM_HISTORIES.items():
        for seed, means in zip(SEEDS, per_seed, strict=True):
            history = [
                {"round": r, "phase": "warmup" if r < 2 else "federated", "mean_metric": m,
                 "uplink_mb_per_client": 0.0, "downlink_mb_per_client": 0.0}
                for r, m in enumerate(means)
            ]  # fmt: skip
            best = max(range(5), key=lambda r: (means[r], -r))
            summary = {
                "best_mean": means[best], "best_round": best, "final_mean": means[-1], "metric": "accuracy",
                "evaluate": "received", "trainable_params_per_client": 10, "backbone_params": 1000,
                "history": history,
            }  # fmt: skip
            run_dir = folder / "sarcasm" / method / f"seed{seed}"
            RunFolder(run_dir).root.mkdir(parents=True)
            RunFolder(run_dir).write_summary(summary)
            read = _read_summary(run_dir)
            assert read is not None
            runs.append(RunResult(RunSpec("sarcasm", method, seed, config, run_dir), read, "reused", 0.0))
    return runs


def test_the_best_federated_round_gets_its_own_table_paired_differences_and_csv_columns(
    config: ExperimentConfig, tmp_path: Path
) -> None:
    """The best round of FedTreeLoRA is a warm-up round, so it ranks first at the best round and last at the
    best round after warm-up; old run folders get that round from their history."""
    runs = _warm_runs(config, tmp_path / "runs")
    assert [r.summary["best_round"] for r in runs[:3]] == [0, 0, 0], "a warm-up round: what this test is about"
    assert [r.summary["best_federated_round"] for r in runs[:3]] == [3, 3, 4]
    methods, columns = ["fedit", "fedtreelora"], [Column("sarcasm", "sarcasm")]
    tables = paired_tables(runs, methods, columns)
    rows = summarise(runs, ["sarcasm"], methods, columns)
    _add_differences(rows, tables)
    tree = rows[1]
    assert tree["sarcasm_best_mean"] == pytest.approx(82.0) and tree["sarcasm_best_std"] == pytest.approx(2.0)
    assert tree["sarcasm_best_federated_mean"] == pytest.approx((74 + 76 + 78) / 3)
    assert tree["diff_fedit_sarcasm_best_mean"] == pytest.approx(82.0 - 74.0)
    assert tree["diff_fedit_sarcasm_best_federated_mean"] == pytest.approx(76.0 - 74.0)
    files = write_outputs(tmp_path, rows, runs, ["sarcasm"], _meta(runs, tables), ["sarcasm"], list(tables))
    markdown = files["table.md"].read_text()
    best = markdown.index("at the best round (as the paper reports)")
    federated = markdown.index("at the best federated round (the best round after warm-up)")
    assert best < federated < markdown.index("at the final round")
    assert "| fedtreelora | **76.00 ± 2.00** | **76.00 ± 2.00** |" in markdown[federated:], "ahead after warm-up"
    assert "### best federated round (after warm-up)" in markdown
    assert "| fedtreelora | +2.00 ± 2.00 (n=3) | +2.00 ± 2.00 (n=3) |" in markdown
    header = files["table.csv"].read_text().splitlines()[0].split(",")
    assert header == csv_columns(["sarcasm"], ["fedit"])
    earlier = [c for c in header if "best_federated" not in c]
    assert header[: len(earlier)] == earlier, "the earlier columns keep their places; the new ones come last"
    record = json.loads(files["compare.json"].read_text())
    assert [r["best_federated_round"] for r in record["runs"]][:3] == [3, 3, 4]


def test_a_category_column_takes_its_clients_at_the_best_federated_round(config: ExperimentConfig) -> None:
    summary = {
        "best_mean": 0.9, "final_mean": 0.5, "best_federated_mean": 0.6, "client_categories": ["a", "b", "a"],
        "per_client_best_round": [0.9, 0.9, 0.9], "per_client_best_federated_round": [0.4, 0.9, 0.6],
        "per_client": [0.5, 0.5, 0.5], "trainable_params_per_client": 10, "backbone_params": 1000, "history": [],
    }  # fmt: skip
    run = RunResult(RunSpec("nlg", "fedit", 1, config, Path("x")), summary, "reused", 0.0)
    columns = table_columns([run], ["nlg"])
    row = summarise([run], ["nlg"], ["fedit"], columns)[0]
    assert row["a_best_federated_mean"] == pytest.approx(50.0) and row["b_best_federated_mean"] == pytest.approx(90.0)
    assert row["a_best_mean"] == pytest.approx(90.0)


# ----------------------------------------------------------------------------------------------
# planted groups: the ARI of the sharing partitions (fake runs, nothing trains)
# ----------------------------------------------------------------------------------------------

PLANTED = ["sarcasm/plain", "sarcasm/plain", "sarcasm/flipped", "tweets/plain", "tweets/flipped", "tweets/flipped"]
LEVELS = [[name.split("/")[0] for name in PLANTED], PLANTED]
ARI = {  # method -> seed -> (layers, depths); null: a cell the run could not score
    "local": {1: [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]], 2: [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]},
    "fedtreelora": {1: [[1.0, 0.5], [0.2, None], [0.0, 1.0]], 2: [[0.6, 0.3], [0.4, 0.1], [-0.2, 1.0]]},
    "ffa": {1: None, 2: None},
}


def _planted_runs(config: ExperimentConfig) -> list[RunResult]:
    """Two seeds of each method in :data:`ARI` on a ``hierarchy`` federation (planted groups) and on
    ``sarcasm`` (none)."""
    runs = _fake_runs(config, {m: LOCAL_BEST for m in ARI}, ("sarcasm", "hierarchy"))
    runs = [r for r in runs if r.spec.seed in (1, 2)]
    for r in runs:
        if r.spec.dataset == "hierarchy":
            ari = ARI[r.spec.method][r.spec.seed]
            r.summary = RunSummary({**r.summary, "planted_groups": PLANTED, "planted_levels": LEVELS, "ari": ari})
    return runs


def _summaries_by_key(runs: list[RunResult]) -> dict[tuple[str, str, int], dict]:
    return {(r.spec.method, r.spec.dataset, r.spec.seed): r.summary for r in runs}


def test_ari_table_matches_hand_computed_numbers(config: ExperimentConfig) -> None:
    methods = ["local", "ffa", "fedtreelora"]
    tables = ari_tables(_summaries_by_key(_planted_runs(config)), methods)
    assert list(tables) == ["hierarchy"]  # sarcasm has no planted groups
    table = tables["hierarchy"]
    assert table["depths"] == [
        ["sarcasm", "tweets"],
        ["sarcasm/plain", "sarcasm/flipped", "tweets/plain", "tweets/flipped"],
    ]
    assert table["layers"] == 3 and table["methods"] == ["local", "fedtreelora"] and table["skipped"] == ["ffa"]
    tree = table["rows"]["fedtreelora"]
    assert tree["seeds"] == [1, 2]
    for layer, depth, values in [(0, 0, [1.0, 0.6]), (0, 1, [0.5, 0.3]), (1, 0, [0.2, 0.4]), (2, 0, [0.0, -0.2])]:
        mean, std = _hand_mean_std(values)
        assert tree["mean"][layer][depth] == pytest.approx(mean) and tree["std"][layer][depth] == pytest.approx(std)
        assert tree["n"][layer][depth] == 2
    assert tree["std"][0][0] == pytest.approx(math.sqrt(0.08))  # (0.2^2 + 0.2^2) / (2 - 1)
    assert (tree["mean"][1][1], tree["std"][1][1], tree["n"][1][1]) == (pytest.approx(0.1), 0.0, 1)  # one null
    assert (tree["mean"][2][1], tree["std"][2][1]) == (pytest.approx(1.0), pytest.approx(0.0))
    assert table["rows"]["local"]["mean"] == [[0.0, 0.0]] * 3
    assert table["runs"][:2] == [
        {"method": "local", "seed": 1, "ari": ARI["local"][1]},
        {"method": "local", "seed": 2, "ari": ARI["local"][2]},
    ]
    assert {"method": "ffa", "seed": 2, "ari": None} in table["runs"] and len(table["runs"]) == 6


def test_ari_section_in_table_md_and_compare_json(config: ExperimentConfig, tmp_path: Path) -> None:
    methods = ["local", "ffa", "fedtreelora"]
    runs = _planted_runs(config)
    columns = [Column("sarcasm", "sarcasm"), Column("hierarchy", "hierarchy")]
    tables = paired_tables(runs, methods, columns)
    rows = summarise(runs, ["sarcasm", "hierarchy"], methods, columns)
    _add_differences(rows, tables)
    meta = {**_meta(runs, tables), "sources": {"sarcasm": "sarcasm", "hierarchy": "sarcasm+tweets"}}
    meta["ari"] = ari_tables(_summaries_by_key(runs), methods)
    files = write_outputs(tmp_path, rows, runs, ["sarcasm", "hierarchy"], meta, ["sarcasm", "hierarchy"], list(tables))
    markdown = files["table.md"].read_text()
    section = markdown[markdown.index(f"## {ARI_TITLE}") :]
    assert markdown.index("## Paired differences to local") < markdown.index(f"## {ARI_TITLE}")
    assert markdown.count(f"## {ARI_TITLE}") == 1 and ARI_RULE in section
    assert "### hierarchy" in section and "### sarcasm" not in section
    assert (
        "Planted groups by depth (depth 1: sarcasm, tweets; depth 2: sarcasm/plain, sarcasm/flipped, tweets/plain, "
        "tweets/flipped)." in section
    )
    depth1 = section[section.index("#### depth 1 (2 groups)") : section.index("#### depth 2 (4 groups)")]
    depth2 = section[section.index("#### depth 2 (4 groups)") :]
    assert "| method | layer 1 | layer 2 | layer 3 |" in depth1
    assert "| local | 0.00 ± 0.00 | 0.00 ± 0.00 | 0.00 ± 0.00 |" in depth1
    assert "| fedtreelora | 0.80 ± 0.28 | 0.30 ± 0.14 | -0.10 ± 0.14 |" in depth1
    assert "| fedtreelora | 0.40 ± 0.14 | 0.10 ± 0.00 (n=1) | 1.00 ± 0.00 |" in depth2
    assert "| ffa |" not in section
    assert "Not shown, no sharing partition to score: ffa." in section
    record = json.loads(files["compare.json"].read_text())
    assert record["ari"]["hierarchy"]["skipped"] == ["ffa"]
    assert {"method": "fedtreelora", "seed": 1, "ari": [[1.0, 0.5], [0.2, None], [0.0, 1.0]]} in (
        record["ari"]["hierarchy"]["runs"]
    )
    assert record["ari"]["hierarchy"]["rows"]["fedtreelora"]["mean"][0][0] == pytest.approx(0.8)


def test_no_ari_section_without_planted_groups(config: ExperimentConfig, tmp_path: Path) -> None:
    methods = ["fedit", "fedtreelora"]
    runs = _fake_runs(config, {"fedit": FEDIT_BEST, "fedtreelora": TREE_BEST})
    assert ari_tables(_summaries_by_key(runs), methods) == {}
    columns = [Column("sarcasm", "sarcasm")]
    rows = summarise(runs, ["sarcasm"], methods, columns)
    meta = {**_meta(runs, {}), "ari": ari_tables(_summaries_by_key(runs), methods)}
    files = write_outputs(tmp_path, rows, runs, ["sarcasm"], meta, ["sarcasm"])
    markdown = files["table.md"].read_text()
    assert ARI_TITLE not in markdown and "ARI" not in markdown
    assert ARI_TITLE not in render_markdown(rows, ["sarcasm"], _meta(runs, {}))  # older callers: no key at all


def test_source_of_a_federation_built_from_groups() -> None:
    groups = [
        {"name": "sarcasm/plain", "dataset": "sarcasm", "clients": 2},
        {"name": "tweets/plain", "dataset": "tweets", "clients": 2},
        {"name": "sarcasm/flipped", "dataset": "sarcasm", "clients": 1},
    ]
    grouped = load_config(overrides=[f"data.groups={json.dumps(groups)}", "data.num_clients=5"])
    assert _source(grouped) == "sarcasm+tweets"
    assert _source(load_config(overrides=["data.dataset=tweets"])) == "tweets"
    assert _source(load_config(overrides=["data.dataset=glue", "data.hub_config=sst2"])) == "glue/sst2"


# ----------------------------------------------------------------------------------------------
# the smoke suite, end to end
# ----------------------------------------------------------------------------------------------


def _summaries(out: Path) -> dict[tuple[str, str, int], dict]:
    found = {}
    for path in sorted((out / "runs").glob("*/*/seed*/summary.json")):
        dataset, method, seed = path.parts[-4], path.parts[-3], int(path.parts[-2].removeprefix("seed"))
        found[(dataset, method, seed)] = json.loads(path.read_text())
    return found


def _mtimes(out: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in (out / "runs").glob("*/*/seed*/summary.json")}


def _expected(values: list[float]) -> tuple[float, float]:
    arr = 100.0 * np.asarray(values)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


@pytest.mark.slow
def test_compare_smoke_suite_tables_reuse_and_redo(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    suite = load_suite("nlu-smoke")
    methods = suite.default_methods()  # every registered method
    datasets = list(suite.datasets)
    # The suite on a 1-layer cut, less data and 2 rounds (1 warm-up, 1 federated) in every call: the tables,
    # the reuse and the reruns checked here do not depend on how much each run trains.
    smaller = ["model.num_layers=1", "data.n_train=16", "data.n_val=8", "federation.rounds=2"]
    sets = [arg for assignment in smaller for arg in ("--set", assignment)]
    assert main(["compare", "--suite", "nlu-smoke", *sets, "--out", str(out), "--quiet"]) == 0

    runs = _summaries(out)
    assert set(runs) == {(d, m, 1) for d in datasets for m in methods}
    # every method of one (dataset, seed) trained and was evaluated on the same clients
    for dataset in datasets:
        partitions = {(out / "runs" / dataset / m / "seed1" / "partition.json").read_text() for m in methods}
        assert len(partitions) == 1, dataset

    with (out / "table.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == methods
    assert list(rows[0]) == csv_columns(datasets)
    markdown = (out / "table.md").read_text()
    assert "best round" in markdown and "best federated round" in markdown and "final round" in markdown
    assert markdown.count(f"| method | {' | '.join(datasets)} | {AVERAGE} |") == 3
    for row in rows:
        method = row["method"]
        for prefix, key in (("best", "best_mean"), ("best_federated", "best_federated_mean"), ("final", "final_mean")):
            per_dataset = {d: [runs[(d, method, 1)][key]] for d in datasets}
            for dataset, values in per_dataset.items():
                mean, std = _expected(values)
                assert float(row[f"{dataset}_{prefix}_mean"]) == pytest.approx(mean)
                assert float(row[f"{dataset}_{prefix}_std"]) == pytest.approx(std) == 0.0
                assert f"{mean:.2f} ± {std:.2f}" in markdown
            average = float(np.mean([100.0 * v[0] for v in per_dataset.values()]))
            assert float(row[f"{AVERAGE}_{prefix}_mean"]) == pytest.approx(average)
        summaries = [runs[(d, method, 1)] for d in datasets]
        percent = np.mean([100.0 * s["trainable_params_per_client"] / s["backbone_params"] for s in summaries])
        assert float(row["trainable_percent"]) == pytest.approx(percent)
        uplink = np.mean([np.mean([h["uplink_mb_per_client"] for h in s["history"]]) for s in summaries])
        downlink = np.mean([np.mean([h["downlink_mb_per_client"] for h in s["history"]]) for s in summaries])
        assert float(row["uplink_mb_per_client_per_round"]) == pytest.approx(uplink)
        assert float(row["downlink_mb_per_client_per_round"]) == pytest.approx(downlink)
        assert f"| {method} |" in markdown
    local = next(r for r in rows if r["method"] == "local")
    assert float(local["uplink_mb_per_client_per_round"]) == 0.0

    # a second invocation reuses every finished run
    before = _mtimes(out)
    again = run_compare(suite, out, overrides=smaller, quiet=True)
    assert again.executed == [] and len(again.reused) == len(runs)
    assert _mtimes(out) == before
    assert [r["method"] for r in again.rows] == methods
    assert json.loads((out / "compare.json").read_text())["partition_mismatches"] == []

    # an interrupted run (no summary yet) resumes from its last checkpoint
    (out / "runs" / "sarcasm" / "fedit" / "seed1" / "summary.json").unlink()
    resumed = run_compare(suite, out, methods=["fedit"], datasets=["sarcasm"], overrides=smaller, quiet=True)
    assert [r.status for r in resumed.runs] == ["resumed"]
    assert resumed.runs[0].summary["best_mean"] == runs[("sarcasm", "fedit", 1)]["best_mean"]

    # a changed setting meets finished runs of another config: an error naming them, before anything is lost
    before = _mtimes(out)
    with pytest.raises(ConfigError, match=r"(?s)1 finished run.*local/seed1: differs at train\.lr.*--replace"):
        run_compare(
            suite, out, methods=["local"], datasets=["sarcasm"], overrides=[*smaller, "train.lr=1e-3"], quiet=True
        )
    assert _mtimes(out) == before

    # with replace=True it is run again; the other runs stay as they were
    redo = run_compare(
        suite, out, methods=["local"], datasets=["sarcasm"], overrides=[*smaller, "train.lr=1e-3"], quiet=True,
        replace=True,
    )  # fmt: skip
    assert [(r.spec.method, r.status) for r in redo.runs] == [("local", "rerun")]
    redone = out / "runs" / "sarcasm" / "local" / "seed1"
    assert "lr: 0.001" in (redone / "config.yaml").read_text()
    after = _mtimes(out)
    assert after[str(redone / "summary.json")] != before[str(redone / "summary.json")]
    assert {k: v for k, v in after.items() if "/local/" not in k or "sarcasm" not in k} == {
        k: v for k, v in before.items() if "/local/" not in k or "sarcasm" not in k
    }
    assert not math.isnan(redo.rows[0]["sarcasm_best_mean"])
