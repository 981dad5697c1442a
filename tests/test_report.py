"""Run reports: files, self-contained HTML, real images, dendrogram cuts, and a headless browser render."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.cluster.hierarchy import fcluster, linkage

from fedtreelora.cli import main
from fedtreelora.config import load_config
from fedtreelora.core.tree import cut_exact
from fedtreelora.engines import SimulationEngine
from fedtreelora.report import cut_height, load_run, plot_compare, write_report
from fedtreelora.report.plots import plot_tree
from fedtreelora.report.render import FIGURE_NAMES, FIGURES_DIR

TINY = [
    "model.num_layers=2",
    "data.num_clients=5",
    "data.n_train=32",
    "data.n_val=16",
    "train.batch_size=16",
    "federation.rounds=3",
    "fedtreelora.warmup_rounds=1",
    "fedtreelora.tau=-1",  # the first layer leaves the root, so the tree has a visible cut
]
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A FedTreeLoRA run and a local-training run (no tree), each with its report written."""
    out = {}
    for method, rounds in (("fedtreelora", 3), ("local", 2)):
        folder = tmp_path_factory.mktemp(method)
        config = load_config(overrides=[*TINY, f"federation.rounds={rounds}"], method=method)
        SimulationEngine(config, folder, quiet=True).run()
        write_report(folder)
        out[method] = folder
    return out


def assert_real_image(png: bytes) -> np.ndarray:
    """A valid PNG with visible content (not one flat colour); returns it as (h, w, 3) uint8."""
    image = Image.open(io.BytesIO(png))
    image.verify()
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 10, "image is (nearly) blank"
    assert (pixels.min(axis=-1) < 200).mean() > 0.01, "image is (nearly) all white"
    return pixels


@pytest.mark.slow
def test_report_files_and_self_contained_html(runs: dict[str, Path]) -> None:
    run = runs["fedtreelora"]
    html_text = (run / "report.html").read_text()
    md_text = (run / "report.md").read_text()
    # Self-contained: no links to anything outside the page, every image an embedded PNG.
    assert "http://" not in html_text and "https://" not in html_text
    assert "<script" not in html_text and "<link" not in html_text and "url(" not in html_text
    sources = re.findall(r'src="([^"]*)"', html_text)
    assert len(sources) == len(FIGURE_NAMES)
    for name, src in zip(FIGURE_NAMES, sources, strict=True):
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        png = base64.b64decode(src[len(prefix) :])
        assert png == (run / FIGURES_DIR / f"{name}.png").read_bytes(), name
        assert_real_image(png)
        assert f"]({FIGURES_DIR}/{name}.png)" in md_text
    for fact in ("fedtreelora", "sarcasm", "final mean accuracy", "mean lambda"):
        assert fact in html_text and fact in md_text


@pytest.mark.slow
def test_dendrogram_cut_lines_give_the_runs_cuts(runs: dict[str, Path]) -> None:
    run = load_run(runs["fedtreelora"])
    cuts = run.summary["cuts"]
    assert cuts is not None and cuts[0] >= 2
    drawn = plot_tree(run)
    assert drawn is not None
    fig, heights = drawn
    assert sorted(heights) == list(range(len(cuts)))
    line_heights = {
        round(line.get_ydata()[0], 9) for line in fig.axes[0].lines if str(line.get_gid()).startswith("cut-")
    }
    for layer, c in enumerate(cuts):
        assert round(heights[layer], 9) in line_heights
        clusters = fcluster(run.tree, t=heights[layer], criterion="distance")
        assert len(set(clusters.tolist())) == c, (layer, c)


def test_cut_height_separates_exactly_c_clusters() -> None:
    rng = np.random.default_rng(0)
    points = rng.normal(size=(7, 3))
    tree = linkage(points, method="average")
    for c in range(1, 8):
        assert len(set(fcluster(tree, t=cut_height(tree, c), criterion="distance").tolist())) == c
    with pytest.raises(ValueError):
        cut_height(tree, 8)


@pytest.mark.slow
def test_lambda_and_label_counts_come_from_the_run_folder(runs: dict[str, Path]) -> None:
    run = load_run(runs["fedtreelora"])
    table = run.lambdas()
    assert table is not None and table.values.shape == (5, 4)  # 5 clients x (2 layers x query, value)
    assert np.all((table.values > 0) & (table.values < 1)) and np.abs(table.values - 0.5).max() > 1e-3
    counts, names = run.label_counts()  # type: ignore[misc]
    assert counts.shape == (5, 2) and counts.sum(axis=1).tolist() == [32] * 5 and len(names) == 2


@pytest.mark.slow
def test_layers_shared_by_everyone_have_no_lambda(runs: dict[str, Path], tmp_path: Path) -> None:
    """Where a layer is one cluster the cluster expert acts alone: no lambda is plotted there, and an
    export weighs the experts (1, 0) whatever the stored logit says."""
    import json
    import shutil

    from fedtreelora.adapters.export import expert_weights

    run_dir = tmp_path / "run"
    shutil.copytree(runs["fedtreelora"], run_dir)
    meta_path = run_dir / "clients" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["final_phase"]["single_layers"] = [0]
    meta_path.write_text(json.dumps(meta))
    table = load_run(run_dir).lambdas()
    assert table is not None
    first = np.asarray(table.layers) == 0
    assert np.isnan(table.values[:, first]).all() and np.isfinite(table.values[:, ~first]).all()
    state = {"enc.0.q.mix_logit": torch.tensor(2.0), "enc.1.q.mix_logit": torch.tensor(2.0)}
    phase = meta["final_phase"]
    assert expert_weights(phase, state, "enc.0.q") == [1.0, 0.0]
    lam = float(torch.sigmoid(torch.tensor(2.0)))
    assert expert_weights(phase, state, "enc.1.q") == pytest.approx([lam, 1.0 - lam])


@pytest.mark.slow
def test_client_curves_follow_the_evaluation_convention(runs: dict[str, Path]) -> None:
    run = load_run(runs["fedtreelora"])
    assert run.evaluate == "received"
    rows = {(int(r["round"]), int(r["client"])): r for r in run.metrics}
    received, trained = run.accuracy_matrix(), run.accuracy_matrix("trained")
    for (rnd, k), row in rows.items():
        assert received[k, rnd] == row["received_accuracy"] and trained[k, rnd] == row["accuracy"]


@pytest.mark.slow
def test_method_without_tree_says_so(runs: dict[str, Path]) -> None:
    run = runs["local"]
    html_text = (run / "report.html").read_text()
    assert "builds no client tree" in html_text and "no client tree" in (run / "report.md").read_text()
    assert "does not mix experts with a learned lambda" in html_text
    assert not (run / FIGURES_DIR / "tree.png").exists() and not (run / FIGURES_DIR / "lambda.png").exists()
    assert_real_image((run / FIGURES_DIR / "sharing.png").read_bytes())  # every client its own cluster
    assert load_run(run).labels.tolist() == [[0, 1, 2, 3, 4]] * 2  # type: ignore[union-attr]


@pytest.mark.slow
def test_cli_report(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "run"
    shutil.copytree(runs["local"], copy)
    (copy / "report.html").unlink()
    assert main(["report", str(copy)]) == 0
    assert (copy / "report.html").is_file() and "report.html" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "summary.json" in capsys.readouterr().err


def test_plot_compare_draws_grouped_bars(tmp_path: Path) -> None:
    rows = [
        {"method": m, "dataset": d, "mean": mean, "std": std}
        for d in ("sst2", "qnli")
        for m, mean, std in (("fedit", 0.81, 0.02), ("fedtreelora", 0.88, 0.01), ("local", 0.84, None))
    ]
    path = plot_compare(rows, tmp_path / "charts" / "compare.png")
    assert path.is_file()
    assert_real_image(path.read_bytes())
    with pytest.raises(ValueError):
        plot_compare([], tmp_path / "empty.png")


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless check needs Debian's chromium (apt-get install chromium)")
def test_report_renders_in_headless_chromium(runs: dict[str, Path], tmp_path: Path) -> None:
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                str(CHROMIUM),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                "--window-size=1200,2400",
                f"--screenshot={shot}",
                (runs["fedtreelora"] / "report.html").resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
    pixels = assert_real_image(shot.read_bytes())
    # The figures really drew: the sharing map and label bars fill large areas with matplotlib's C0 blue
    # (31, 119, 180); a page of broken-image icons and text would have none.
    blue = (np.abs(pixels.astype(int) - np.array([31, 119, 180])).max(axis=-1) <= 8).sum()
    assert blue > 5000, blue


def test_partial_participation_report_from_a_hand_made_run_folder(tmp_path: Path) -> None:
    """A tree over the 4 clients that took part in warm-up, client 2 never placed (-1): the tree keeps
    its clients' ids, the cut lines still give the cuts, the sharing map greys the unplaced client.
    Needs no model: everything comes from the run folder's JSON files."""
    members = [0, 1, 3, 4]
    rng = np.random.default_rng(1)
    tree = linkage(rng.normal(size=(4, 3)), method="average")
    cuts = [1, 2, 3]
    labels = np.full((3, 5), -1)
    for layer, c in enumerate(cuts):
        labels[layer, members] = cut_exact(tree, 4, c)
    history = [
        {"round": r, "phase": "warmup" if r == 0 else "federated", "mean_accuracy": 0.5 + 0.1 * r,
         "uplink_mb_per_client": 0.1, "downlink_mb_per_client": 0.0 if r == 0 else 0.2}
        for r in range(3)
    ]  # fmt: skip
    summary = {
        "method": "fedtreelora", "dataset": "toy", "num_clients": 5, "final_mean": 0.7, "best_mean": 0.7,
        "best_round": 2, "per_client": [0.7] * 5, "cuts": cuts, "labels": labels.tolist(), "history": history,
        "plan": {"cuts": cuts, "labels": labels.tolist(), "tree": tree.tolist(), "tau": 0.0, "window": 2},
    }  # fmt: skip
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    rows = [
        {"round": r, "client": k, "phase": history[r]["phase"], "accuracy": 0.6}
        for r in range(3)
        for k in (members if r == 0 else [0, 1, 3])
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    html_path, md_path = write_report(tmp_path)
    run = load_run(tmp_path)
    assert run.tree_clients == members
    fig, heights = plot_tree(run)  # type: ignore[misc]
    assert {t.get_text() for t in fig.axes[0].get_xticklabels()} == {"0", "1", "3", "4"}
    for layer, c in enumerate(cuts):
        assert len(set(fcluster(tree, t=heights[layer], criterion="distance").tolist())) == c
    for name in ("tree", "sharing", "accuracy", "communication"):
        assert_real_image((tmp_path / FIGURES_DIR / f"{name}.png").read_bytes())
    assert "no partition record" in md_path.read_text() and "lambda" in html_path.read_text()


def _warmup_best_folder(folder: Path, *, recorded: bool) -> None:
    """A hand-made FedLEASE-like run of 4 rounds, 2 of warm-up, whose best round is the second (warm-up)
    and best round after warm-up the fourth; ``recorded``: as the engine writes it now, else as runs
    were written before the best federated round was recorded (then computed from the history)."""
    means = [0.62, 0.81, 0.70, 0.76]
    history = [
        {"round": r, "phase": "warmup" if r < 2 else "federated", "metric": "accuracy", "evaluate": "received",
         "mean_metric": m, "mean_accuracy": m, "received_mean_metric": m, "trained_mean_metric": m,
         "clients": [0, 1], "uplink_mb_per_client": 0.1, "downlink_mb_per_client": 0.0 if r < 2 else 0.2}
        for r, m in enumerate(means)
    ]  # fmt: skip
    summary = {
        "method": "fedlease", "dataset": "toy", "metric": "accuracy", "evaluate": "received", "num_clients": 2,
        "final_mean": 0.76, "best_mean": 0.81, "best_round": 1, "per_client": [0.75, 0.77],
        "per_client_best_round": [0.8, 0.82], "history": history,
    }  # fmt: skip
    if recorded:
        summary.update(best_federated_mean=0.76, best_federated_round=3, per_client_best_federated_round=[0.75, 0.77])
    (folder / "summary.json").write_text(json.dumps(summary))
    rows = [
        {
            "round": r,
            "client": k,
            "phase": history[r]["phase"],
            "accuracy": m,
            "received_accuracy": m + 0.01 * (2 * k - 1),
        }
        for r, m in enumerate(means)
        for k in range(2)
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.mark.parametrize("recorded", [True, False])
def test_the_report_shows_the_best_round_after_warmup_beside_the_best_round(tmp_path: Path, recorded: bool) -> None:
    """The overview names both rounds (a run folder written before the second was recorded gets it from its
    history), and the accuracy figure marks both."""
    _warmup_best_folder(tmp_path, recorded=recorded)
    html_path, md_path = write_report(tmp_path)
    markdown = md_path.read_text()
    assert "| best mean accuracy | 0.8100 (round 2) |" in markdown
    assert "| best federated mean accuracy | 0.7600 (round 4; the best round after warm-up) |" in markdown
    assert "0.7600 (round 4; the best round after warm-up)" in html_path.read_text()
    run = load_run(tmp_path)
    assert run.summary["per_client_best_federated_round"] == pytest.approx([0.75, 0.77])
    from fedtreelora.report.plots import plot_accuracy

    labels = plot_accuracy(run).axes[0].get_legend_handles_labels()[1]
    assert "best" in labels and "best after warm-up" in labels
