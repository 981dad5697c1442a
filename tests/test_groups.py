"""Federations with planted structure (``data.groups``): configuration, the partition, ARI against the
planted hierarchy, and one tiny end-to-end run that records them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from fedtreelora.config import load_config
from fedtreelora.core.structure import ari_by_layer, planted_levels
from fedtreelora.data import ClassificationDataset, ClientData, load_classification, planted_groups
from fedtreelora.engines import SimulationEngine
from fedtreelora.engines.setup import load_partitioned_data
from fedtreelora.errors import ConfigError
from fedtreelora.report import load_run
from fedtreelora.report.render import FIGURES_DIR

SWAP = {"not_sarcastic": "sarcastic", "sarcastic": "not_sarcastic"}


def grouped(groups: list[dict[str, Any]], *overrides: str, **data: Any) -> Any:
    """A validated config whose ``data.groups`` is ``groups`` (and other ``data`` keys from ``data``)."""
    return load_config(
        overrides=[f"data.groups={json.dumps(groups)}", *overrides, *(f"data.{k}={v}" for k, v in data.items())]
    )


HIERARCHY = [
    {"name": "sarcasm/plain", "dataset": "sarcasm", "clients": 2},
    {"name": "sarcasm/flipped", "dataset": "sarcasm", "clients": 3, "label_map": SWAP},
    {"name": "tweets/calm", "dataset": "tweets", "clients": 2, "n_train": 20, "label_map": {"neutral": None}},
]


@pytest.fixture(scope="module")
def sources() -> dict[str, ClassificationDataset]:
    return {name: load_classification(name) for name in ("sarcasm", "tweets")}


@pytest.fixture(scope="module")
def federation() -> tuple[ClassificationDataset, list[ClientData]]:
    config = grouped(HIERARCHY, "model.head=local", n_train=32, n_val=16)
    return load_partitioned_data(config)


def source_label(source: ClassificationDataset, text: str) -> str:
    """The label name ``text`` has in ``source`` (builtins are de-duplicated, so texts are unique)."""
    for pool in (source.train, source.validation):
        if text in pool.texts:
            return pool.label_names[pool.labels[pool.texts.index(text)]]
    raise KeyError(text)


# --- names and levels -------------------------------------------------------------------------------


def test_levels_are_the_name_prefixes() -> None:
    names = ["news/plain", "news/plain", "news/flipped", "tweets"]
    assert planted_levels(names) == [
        ["news", "news", "news", "tweets"],
        ["news/plain", "news/plain", "news/flipped", "tweets"],
    ]
    assert planted_levels(["a/b/c", "a/d"]) == [["a", "a"], ["a/b", "a/d"], ["a/b/c", "a/d"]]
    assert planted_levels([]) == []


def test_planted_groups_come_from_the_config_in_group_order() -> None:
    config = grouped(HIERARCHY)
    assert planted_groups(config.data) == ["sarcasm/plain"] * 2 + ["sarcasm/flipped"] * 3 + ["tweets/calm"] * 2
    assert config.data.num_clients == 7
    assert planted_groups(load_config().data) is None


def test_num_clients_may_be_given_when_it_agrees() -> None:
    assert grouped(HIERARCHY, num_clients=7).data.num_clients == 7
    with pytest.raises(ConfigError, match=r"data.num_clients=6 but data.groups hold 2 \+ 3 \+ 2 = 7"):
        grouped(HIERARCHY, num_clients=6)


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["a//b"], r"data.groups\[0\].name='a//b' has an empty or invalid part ''"),
        (["a/b c"], r"invalid part 'b c'"),
        (["a", "b", "a"], r"data.groups\[2\].name='a' repeats data.groups\[0\].name"),
        (["news", "news/plain"], r"data.groups\[0\].name='news' is a group and also a prefix of data.groups\[1\]"),
    ],
)
def test_bad_group_names_are_errors(names: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        grouped([{"name": n, "clients": 1} for n in names])


def test_groups_are_for_classification_only() -> None:
    with pytest.raises(ConfigError, match=r"data.groups\[0\] \(a\) draws generation data .*classification only"):
        grouped([{"name": "a", "clients": 2, "dataset": "evals-nlg"}])


def test_integer_label_names_in_a_map_are_read_as_text() -> None:
    config = grouped([{"name": "a", "clients": 1, "label_map": {0: 1, 1: None}}])
    assert config.data.groups[0].label_map == {"0": "1", "1": None}


# --- the partition ----------------------------------------------------------------------------------


def test_groups_of_one_source_get_disjoint_examples(federation: tuple[ClassificationDataset, list[ClientData]]) -> None:
    dataset, clients = federation
    assert dataset.name == "sarcasm+tweets"
    for pool, key in ((dataset.train, "train_indices"), (dataset.validation, "val_indices")):
        indices = np.concatenate([getattr(c, key) for c in clients])
        assert len(set(indices.tolist())) == indices.size == len(pool), "the pools hold exactly the clients' examples"
        assert len(set(pool.texts)) == len(pool), "no example twice, in or across groups"
    assert not set(dataset.train.texts) & set(dataset.validation.texts)


def test_label_map_flips_and_drops(
    federation: tuple[ClassificationDataset, list[ClientData]], sources: dict[str, ClassificationDataset]
) -> None:
    dataset, clients = federation
    assert dataset.label_names == ["negative", "not_sarcastic", "positive", "sarcastic"]
    group_of = planted_groups(grouped(HIERARCHY).data)
    for c in clients:
        group = group_of[c.client]
        source = sources[group.split("/")[0]]
        for pool, indices in ((dataset.train, c.train_indices), (dataset.validation, c.val_indices)):
            for i in indices:
                text, label = pool.texts[i], pool.label_names[pool.labels[i]]
                original = source_label(source, text)
                expected = SWAP[original] if group == "sarcasm/flipped" else original
                assert label == expected, (group, text)
        if group == "tweets/calm":
            assert "neutral" not in dataset.label_names
            assert c.train_label_counts[[1, 3]].sum() == 0  # no sarcasm labels in the tweets group


def test_sizes_and_counts_are_per_group_in_the_global_label_space(
    federation: tuple[ClassificationDataset, list[ClientData]],
) -> None:
    dataset, clients = federation
    assert [len(c.train_indices) for c in clients] == [32] * 5 + [20] * 2
    assert [len(c.val_indices) for c in clients] == [16] * 7
    assert [c.client for c in clients] == list(range(7))
    for c in clients:
        assert c.proportions.shape == c.train_label_counts.shape == (4,)
        assert c.proportions.sum() == pytest.approx(1.0)
        np.testing.assert_array_equal(
            c.train_label_counts, np.bincount(dataset.train.labels[c.train_indices], minlength=4)
        )
        np.testing.assert_array_equal(
            c.val_label_counts, np.bincount(dataset.validation.labels[c.val_indices], minlength=4)
        )


def test_each_group_has_its_own_label_skew() -> None:
    config = grouped(
        [
            {"name": "skewed", "dataset": "tweets", "clients": 3, "dirichlet_alpha": 0.01},
            {"name": "even", "dataset": "tweets", "clients": 3, "dirichlet_alpha": 1000.0},
        ],
        n_train=30,
        n_val=9,
    )
    _, clients = load_partitioned_data(config)
    assert all(c.proportions.min() < 1e-3 for c in clients[:3])
    assert all(np.abs(c.proportions - 1 / 3).max() < 0.05 for c in clients[3:])


def test_the_partition_follows_the_seed() -> None:
    def draw(seed: int) -> list[list[str]]:
        dataset, clients = load_partitioned_data(
            grouped(HIERARCHY, "model.head=local", f"seed={seed}", n_train=8, n_val=4)
        )
        return [[dataset.train.texts[i] for i in c.train_indices] for c in clients]

    assert draw(0) == draw(0)
    assert draw(0) != draw(1)


def test_unknown_label_in_a_map_names_the_field_and_the_labels() -> None:
    config = grouped(
        [{"name": "a", "dataset": "sarcasm", "clients": 1, "label_map": {"ironic": "x"}}], n_train=4, n_val=2
    )
    with pytest.raises(
        ConfigError, match=r"data.groups\[0\].label_map .*\['ironic'\].*\['not_sarcastic', 'sarcastic'\]"
    ):
        load_partitioned_data(config)


def test_different_label_sets_need_a_local_head_or_maps() -> None:
    groups = [{"name": "s", "dataset": "sarcasm", "clients": 1}, {"name": "t", "dataset": "tweets", "clients": 1}]
    with pytest.raises(ConfigError, match=r"label sets differ .*model.head=local.*label_map"):
        load_partitioned_data(grouped(groups, n_train=4, n_val=2))
    mapped = [
        groups[0],
        {**groups[1], "label_map": {"negative": "not_sarcastic", "positive": "sarcastic", "neutral": None}},
    ]
    dataset, _ = load_partitioned_data(grouped(mapped, n_train=4, n_val=2))
    assert dataset.label_names == ["not_sarcastic", "sarcastic"]


def test_sentence_pairs_and_single_sentences_do_not_mix() -> None:
    groups = [{"name": "s", "dataset": "sarcasm", "clients": 1}, {"name": "c", "dataset": "corr2cause", "clients": 1}]
    with pytest.raises(ConfigError, match=r"data.groups\[1\] \(c\) reads sentence pairs"):
        load_partitioned_data(grouped(groups, "model.head=local", n_train=4, n_val=2))


def test_a_source_too_small_for_its_groups_names_the_group() -> None:
    groups = [
        {"name": "a", "dataset": "corr2cause", "clients": 2, "n_train": 500},
        {"name": "b", "dataset": "corr2cause", "clients": 1, "n_train": 500},
    ]
    with pytest.raises(
        ConfigError, match=r"data.groups\[1\] \(b\) needs 1 clients x n_train=500 .* left after earlier"
    ):
        load_partitioned_data(grouped(groups, n_val=2))


# --- ARI --------------------------------------------------------------------------------------------


def test_ari_against_hand_computed_values() -> None:
    levels = planted_levels(["a/x", "a/x", "a/y", "a/y", "b/z", "b/z"])
    labels = np.array(
        [
            [0, 0, 0, 0, 0, 0],  # one cluster
            [0, 0, 0, 0, 1, 1],  # exactly depth 1
            [5, 5, 3, 3, 9, 9],  # exactly depth 2, other ids
            [0, 1, 0, 1, 2, 2],
        ]
    )
    ari = ari_by_layer(labels, levels)
    assert ari.shape == (4, 2)
    assert ari[0].tolist() == [0.0, 0.0]
    assert ari[1, 0] == 1.0 and ari[2, 1] == 1.0
    # Depth 2 against depth 1's partition: pairs within a cluster of both: {01, 23, 45} of (14, 15 + 1 = 7 ...)
    # by hand: n=6, contingency [[2,2,0],[0,0,2]] -> sum C(n_ij,2) = 3, rows C(4,2)+C(2,2) = 7,
    # columns 3 x C(2,2) = 3, expected 7 * 3 / 15 = 1.4, max (7 + 3) / 2 = 5: ARI = (3 - 1.4) / (5 - 1.4).
    assert ari[2, 0] == pytest.approx((3 - 1.4) / (5 - 1.4))
    assert ari[3, 1] == pytest.approx(adjusted_rand_score(levels[1], labels[3]))


def test_ari_leaves_unplaced_clients_out() -> None:
    levels = planted_levels(["a", "a", "b", "b", "b"])
    labels = np.array([[0, 0, 1, 1, -1], [0, -1, -1, -1, -1]])
    ari = ari_by_layer(labels, levels)
    assert ari[0, 0] == 1.0
    assert np.isnan(ari[1, 0])
    with pytest.raises(ValueError, match="planted level 1 has 5 clients"):
        ari_by_layer(np.zeros((1, 4), dtype=int), levels)


# --- end to end -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_run_records_planted_groups_and_ari(tmp_path: Path, one_thread: None) -> None:
    """FedIT shares every layer among everyone: at depth 1 (one group, "sarcasm") that is the planted
    partition (ARI 1), at depth 2 (plain vs flipped) it is chance (ARI 0)."""
    groups = [HIERARCHY[0], {**HIERARCHY[1], "clients": 2}]
    config = grouped(
        groups,
        "method=fedit",
        "model.num_layers=1",
        "federation.rounds=2",
        "train.batch_size=8",
        "logging.tensorboard=false",
        n_train=8,
        n_val=8,
    )
    summary = SimulationEngine(config, tmp_path, quiet=True).run()
    assert summary["planted_groups"] == ["sarcasm/plain"] * 2 + ["sarcasm/flipped"] * 2
    assert summary["planted_levels"][0] == ["sarcasm"] * 4
    assert summary["ari"] == [[1.0, 0.0]]
    partition = json.loads((tmp_path / "partition.json").read_text())
    assert [c["group"] for c in partition["clients"]] == summary["planted_groups"]
    assert [g["name"] for g in partition["groups"]] == ["sarcasm/plain", "sarcasm/flipped"]
    run = load_run(tmp_path)
    assert run.ari is not None and run.ari.shape == (1, 2)
    assert (tmp_path / FIGURES_DIR / "ari.png").is_file()
    html = (tmp_path / "report.html").read_text()
    assert "Sharing partitions against the planted groups" in html and "adjusted Rand index" in html


def test_report_draws_the_ari_heatmap_from_the_run_folder(tmp_path: Path) -> None:
    """Needs no model: a hand-made summary with planted groups gets the ARI figure, with every value
    written in its cell; a summary without them gets no such section."""
    from PIL import Image

    from fedtreelora.report import write_report
    from fedtreelora.report.plots import plot_ari

    names = ["a/x", "a/x", "a/y", "a/y", "b/z", "b/z"]
    labels = np.array([[0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 2, 2], [0, 1, 2, 3, 4, -1]])
    levels = planted_levels(names)
    ari = ari_by_layer(labels, levels)
    history = [{"round": r, "phase": "federated", "mean_accuracy": 0.6} for r in range(2)]
    summary = {
        "method": "fedtreelora", "dataset": "toy", "num_clients": 6, "final_mean": 0.6, "best_mean": 0.6,
        "best_round": 0, "per_client": [0.6] * 6, "cuts": [2, 3, 5], "labels": labels.tolist(), "history": history,
        "planted_groups": names, "planted_levels": levels, "ari": ari.tolist(),
    }  # fmt: skip
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    html_path, md_path = write_report(tmp_path)
    run = load_run(tmp_path)
    np.testing.assert_allclose(run.ari, ari)  # type: ignore[arg-type]
    fig = plot_ari(run)
    assert fig is not None
    cells = sorted(t.get_text() for t in fig.axes[0].texts)
    assert cells == sorted(f"{v:.2f}" for v in ari.ravel())
    pixels = np.asarray(Image.open(tmp_path / FIGURES_DIR / "ari.png").convert("RGB"))
    assert pixels.shape[0] > 100 and pixels.std() > 10
    assert "at which depth" in fig.axes[0].get_title()
    assert "Sharing partitions against the planted groups" in md_path.read_text()
    assert "planted groups" in html_path.read_text()

    for key in ("planted_groups", "planted_levels", "ari"):
        del summary[key]
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    write_report(tmp_path)
    assert not (tmp_path / FIGURES_DIR / "ari.png").exists()
    assert "planted groups" not in (tmp_path / "report.html").read_text()
