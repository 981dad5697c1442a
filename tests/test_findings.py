"""The one line a run prints where it makes its clusters, and the label-prior check, on hand-made plans and
partitions; and the line on the console of a tiny real run at its plan round."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console

from fedtreelora.core.findings import (
    clusters_finding,
    label_prior,
    layer_span,
    majority_class_ari,
    majority_classes,
    run_finding,
    tree_finding,
)
from fedtreelora.core.plan import SharingPlan
from fedtreelora.report.data import load_run
from fedtreelora.report.render import finding_rows
from fedtreelora.runfolder import RunSummary

TREE = np.zeros((7, 4))  # the line never reads the tree
AUTO = {"level": 0.95, "permutations": 999, "seed": 0}


def _labels(cuts: list[int], clients: int = 8) -> np.ndarray:
    return np.asarray([[k * c // clients for k in range(clients)] for c in cuts], dtype=np.int64)


def _plan(cuts: list[int], scores: list[dict[int, float]], tau: float | str = 0.1, **auto: Any) -> SharingPlan:
    return SharingPlan(np.asarray(cuts), _labels(cuts), TREE, scores, tau, 2, **auto)


def test_layer_span_is_one_based_with_runs_collapsed() -> None:
    assert layer_span([5]) == "layer 6"
    assert layer_span([3, 4, 5]) == "layers 4-6"
    assert layer_span([1, 3, 4, 5]) == "layers 2, 4-6"


def test_a_split_names_its_layers_counts_and_silhouettes_against_tau() -> None:
    scores = [{1: 0.1, 2: 0.05}, {1: 0.1, 2: 0.08}, {1: 0.1, 2: 0.09}, {1: 0.1, 2: 0.21}, {2: 0.25, 3: 0.2}]
    plan = _plan([1, 1, 1, 2, 2, 2], [*scores, {2: 0.31, 3: 0.1}])
    assert tree_finding(plan) == "tree: layers 4-6 of 6 split into 2 clusters; silhouette 0.21-0.31 against tau 0.1"
    # several counts: one "at" per run of layers with the same count, the word "layers" once
    plan = _plan([1, 2, 2, 3, 4], [{1: 0.1, 2: 0.0}, {1: 0.1, 2: 0.4}, {2: 0.3, 3: 0.2}, {3: 0.5}, {4: 0.45}])
    assert tree_finding(plan) == (
        "tree: layers 2-5 of 5 split (2 clusters at 2-3, 3 at 4, 4 at 5); silhouette 0.30-0.50 against tau 0.1"
    )


def test_no_split_gives_the_best_silhouette_and_says_fedit() -> None:
    scores = [{1: 0.3, 2: 0.05}, {1: 0.3, 2: 0.02}, {1: 0.3, 2: 0.08}, {1: 0.3, 2: -0.1}]
    plan = _plan([1, 1, 1, 1], scores, tau=0.3)
    assert tree_finding(plan) == (
        "tree: no structure found: no layer's silhouette beats tau 0.3 (best 0.08, layer 3); "
        "this run is FedIT after warm-up"
    )
    assert tree_finding(plan, personal=True).endswith("this run is FedIT plus a personal expert after warm-up")
    only_one = _plan([1, 1], [{1: 0.3}, {1: 0.3}], tau=0.3)
    assert "no split was tried (window 2, 8 clients)" in tree_finding(only_one)


def test_auto_gives_the_tested_silhouette_against_its_null_quantile() -> None:
    scores = [{2: 0.05}, {2: 0.21}, {2: 0.25, 3: 0.2}, {3: 0.4}]
    split = _plan(
        [1, 2, 2, 3],
        scores,
        tau="auto",
        test_scores=[{2: 0.01}, {2: 0.19}, {3: 0.1}, {3: 0.35}],
        null_quantiles=[{2: 0.3}, {2: 0.12}, {3: 0.4}, {3: 0.3}],
        admissible=[[], [2], [], [3]],
        auto=AUTO,
    )
    assert tree_finding(split) == (
        "tree: layers 2-4 of 4 split (2 clusters at 2-3, 3 at 4); tested silhouette 0.19 against null quantile "
        "0.12 at layer 2, 0.35 against 0.30 at layer 4 (tau auto, level 0.95)"
    )
    none = _plan(
        [1, 1, 1],
        [{2: 0.05}, {2: 0.05}, {2: 0.05}],
        tau="auto",
        test_scores=[{2: 0.01}, {2: 0.25}, {2: 0.1}],
        null_quantiles=[{2: 0.3}, {2: 0.3}, {2: 0.3}],
        admissible=[[], [], []],
        auto=AUTO,
    )
    assert tree_finding(none) == (
        "tree: no structure found: no split was admitted by the relabelling test (closest: tested silhouette "
        "0.25 against null quantile 0.30, layer 2, level 0.95); this run is FedIT after warm-up"
    )
    # A candidate that beats its own null at some layer but was refused elsewhere is not called "closest".
    refused = replace(none, test_scores=[{2: 0.01}, {2: 0.35}, {2: 0.1}])
    assert tree_finding(refused) == (
        "tree: no structure found: no split was admitted (tested silhouette 0.35 beats its null quantile 0.30 "
        "at layer 2, level 0.95, but not at every deeper layer, or the clients were not found to form groups); "
        "this run is FedIT after warm-up"
    )


def test_fedlease_clustering_line() -> None:
    assert clusters_finding(3, {2: 0.1, 3: 0.25, 4: 0.2}) == "clusters: 3 (silhouette 0.25, best of 2-4 clusters)"
    assert clusters_finding(2, {2: 0.3}) == "clusters: 2 (silhouette 0.30, the only count tried)"
    assert clusters_finding(1, {}) == "clusters: 1 (too few clients to compare cluster counts)"


# Six clients whose majority classes are 0, 0, 0, 1, 1, 1 (client 2's tie goes to the lower label).
COUNTS = np.array([[5, 1], [4, 2], [3, 3], [1, 6], [0, 2], [2, 3]])
SHARING = np.array([[0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]])


def test_majority_class_ari_against_a_hand_computed_case() -> None:
    assert majority_classes(COUNTS).tolist() == [0, 0, 0, 1, 1, 1]
    # Layer 1 against {0,1,2},{3,4,5}: pairs together in both 1 + 3 = 4, in the classes 3 + 3 = 6, in the
    # layer 1 + 6 = 7 of 15; ARI = (4 - 6 * 7 / 15) / ((6 + 7) / 2 - 6 * 7 / 15) = 1.2 / 3.7.
    ari = majority_class_ari(SHARING, COUNTS)
    assert ari == pytest.approx([0.0, 12 / 37, 1.0])
    # a client not placed (-1) is left out of its layer's score
    assert majority_class_ari(np.array([[0, 0, -1, 1, 1, 1]]), COUNTS)[0] == pytest.approx(1.0)


def test_label_prior_is_named_only_when_high_non_trivial_and_above_the_planted_groups() -> None:
    prior = label_prior(SHARING, COUNTS)
    assert prior.follows and prior.text == "the clusters follow the clients' majority class (label prior), ARI 1.00"
    # the planted groups explain the clusters as well: no label-prior finding, the number only
    tied = label_prior(SHARING, COUNTS, planted_ari=np.array([[0.0], [0.3], [1.0]]))
    assert not tied.follows and tied.text == "deepest layer's clusters against the clients' majority class: ARI 1.00"
    assert label_prior(SHARING, COUNTS, planted_ari=np.array([[0.0], [0.3], [0.5]])).follows
    # below the threshold, and one cluster at the deepest layer (ARI 1 against one class for everyone)
    assert not label_prior(SHARING[:2], COUNTS).follows
    assert not label_prior(SHARING[:1], np.tile([3, 1], (6, 1))).follows
    assert label_prior(SHARING, COUNTS).to_dict()["ari"] == pytest.approx([0.0, 12 / 37, 1.0])


def test_run_finding_adds_the_planted_ari_and_the_label_prior(tmp_path: Path) -> None:
    plan = _plan([1, 2], [{1: 0.1, 2: 0.0}, {1: 0.1, 2: 0.4}])
    labels = np.array([[0] * 6, [0, 0, 0, 1, 1, 1]])
    summary = {"plan": {**plan.to_dict(), "labels": labels.tolist()}, "labels": labels.tolist()}
    summary["label_counts"] = COUNTS.tolist()
    assert RunSummary(summary).clustering_finding() == (
        "tree: layer 2 of 2 splits into 2 clusters; silhouette 0.40 against tau 0.1; "
        "the clusters follow the clients' majority class (label prior), ARI 1.00"
    )
    summary["ari"] = [[0.0, 0.0], [1.0, 0.4]]
    assert RunSummary(summary).clustering_finding() == (
        "tree: layer 2 of 2 splits into 2 clusters; silhouette 0.40 against tau 0.1; "
        "ARI 1.00 against the planted groups (depth 1 of 2)"
    )
    assert RunSummary({"labels": labels.tolist()}).clustering_finding() is None  # a method that makes no clusters
    # FedLEASE's one clustering, read from its summary fields
    lease = RunSummary({"clusters": 2, "silhouette": {"2": 0.4, "3": 0.1}, "ari": [[1.0]]})
    assert lease.clustering_finding() == run_finding(clusters=2, silhouette={2: 0.4, 3: 0.1}, ari=[[1.0]])
    assert lease.clustering_finding().endswith("; ARI 1.00 against the planted groups")
    # the report shows the recorded line, and the label-prior number where it is no finding
    (tmp_path / "summary.json").write_text(json.dumps({**summary, "finding": "tree: as printed"}))
    rows = dict(finding_rows(load_run(tmp_path)))
    assert rows["what the clustering found"] == "tree: as printed"
    assert rows["clusters against the majority class"].endswith("ARI 1.00")


TINY = [
    "data.groups=null",  # the CLI starts from the quickstart experiment, whose clients are groups
    "model.num_layers=2",
    "data.num_clients=4",
    "data.n_train=16",
    "data.n_val=16",
    "train.batch_size=16",
    "federation.rounds=2",
    "fedtreelora.warmup_rounds=1",
    "fedtreelora.tau=-1",  # every layer splits
    "logging.tensorboard=false",
]


def test_the_line_is_printed_at_the_plan_round_of_a_tiny_run(one_thread: None) -> None:
    from fedtreelora.config import load_config
    from fedtreelora.engines import SimulationEngine

    out = io.StringIO()
    console = Console(file=out, width=400)
    summary = SimulationEngine(load_config(overrides=TINY), None, report=False, console=console).run()
    lines = out.getvalue().splitlines()
    plan_row = next(i for i, line in enumerate(lines) if line.lstrip().startswith("1/2"))
    # right under the row of the round the tree was built, before the next round's row
    assert lines[plan_row + 1].startswith("tree: layers 1-2 of 2 split into 2 clusters; silhouette ")
    assert "against tau -1" in lines[plan_row + 1] and lines[plan_row + 2].lstrip().startswith("2/2")
    assert summary["finding"] == lines[plan_row + 1]
    assert summary["label_prior"]["ari"] and len(summary["label_prior"]["ari"]) == 2


@pytest.mark.slow
def test_run_quiet_prints_the_finding_after_the_result(
    tmp_path: Path, one_thread: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedtreelora.cli import main

    args = ["run", "--quiet", "--out", str(tmp_path / "run")]
    for assignment in TINY:
        args += ["--set", assignment]
    assert main(args) == 0
    captured = capsys.readouterr()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert captured.out.splitlines()[-1] == summary["finding"] and summary["finding"].startswith("tree: ")
    assert "tree: " not in captured.err  # the quiet console printed nothing
    assert "what the clustering found" in (tmp_path / "run" / "report.md").read_text()
