"""Split a configured federation into per-site data folders, to try a deployment on one machine.

Each client's share of the partition (the same examples the in-process engine gives it) becomes a
folder that a SuperNode reads with ``--node-config 'client-id=K data="FOLDER"'``: ``train.csv`` and
``validation.csv`` (columns ``text`` [, ``text_pair``], ``label``) for classification, ``train.jsonl``
and ``validation.jsonl`` (``instruction``, ``input``, ``output``, ``category``, ``task``) for
instruction data. Column names follow the config's ``data.*_column`` options.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from fedtreelora.config import ExperimentConfig
from fedtreelora.data import InstructionSet, LabeledTexts
from fedtreelora.engines.flower.node import SITE_TASK_COLUMN, check_sites_without_drift
from fedtreelora.engines.setup import load_partitioned_data


def write_sites(config: ExperimentConfig, out_dir: str | Path) -> list[Path]:
    """Write ``out_dir/site{K}/`` for every client; returns the folders.

    The column names written are the config's ``data.*_column`` options, so the same config reads
    them back; labels are written by name, and each instruction example's task under
    ``data.task_column`` (or ``task``, which sites read when that option is unset).

    Raises:
        ConfigError: a group drifts (``data.groups[i].drift``): a site's folder holds one set of labels.
    """
    check_sites_without_drift(config)
    dataset, clients = load_partitioned_data(config)
    folders = []
    for c in clients:
        site = Path(out_dir) / f"site{c.client}"
        site.mkdir(parents=True, exist_ok=True)
        for split, indices, pool in (
            ("train", c.train_indices, dataset.train),
            ("validation", c.val_indices, dataset.validation),
        ):
            if isinstance(pool, InstructionSet):
                _write_instructions(config, pool, indices, site / f"{split}.jsonl")
            else:
                _write_texts(config, pool, indices, site / f"{split}.csv")
        folders.append(site)
    return folders


def _write_texts(config: ExperimentConfig, pool: LabeledTexts, indices: np.ndarray, path: Path) -> None:
    d = config.data
    pairs = pool.text_pairs is not None
    header = [d.text_column, *([d.text_pair_column or "text_pair"] if pairs else []), d.label_column]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for i in indices:
            pair = [pool.text_pairs[i]] if pool.text_pairs is not None else []
            writer.writerow([pool.texts[i], *pair, pool.label_names[pool.labels[i]]])


def _write_instructions(config: ExperimentConfig, pool: InstructionSet, indices: np.ndarray, path: Path) -> None:
    d = config.data
    with open(path, "w") as f:
        for i in indices:
            row = {d.instruction_column: pool.instructions[i], d.output_column: pool.outputs[i]}
            if d.input_column is not None:
                row[d.input_column] = pool.inputs[i]
            if d.category_column is not None:
                row[d.category_column] = pool.categories[i]
            row[d.task_column or SITE_TASK_COLUMN] = pool.tasks[i]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
