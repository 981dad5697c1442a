"""Split a configured federation into per-site data folders, to try a deployment on one machine.

Each client's share of the partition (the same examples the in-process engine gives it) becomes a
folder with ``train.csv`` and ``validation.csv`` (columns ``text`` [, ``text_pair``], ``label``), which
a SuperNode reads with ``--node-config 'client-id=K data="FOLDER"'``.
"""

from __future__ import annotations

import csv
from pathlib import Path

from fedtreelora.config import ExperimentConfig
from fedtreelora.engines.setup import load_partitioned_data


def write_sites(config: ExperimentConfig, out_dir: str | Path) -> list[Path]:
    """Write ``out_dir/site{K}/{train,validation}.csv`` for every client; returns the folders.

    The column names written are the config's ``data.text_column`` / ``text_pair_column`` /
    ``label_column``, so the same config reads them back; labels are written by name.
    """
    dataset, clients = load_partitioned_data(config)
    d = config.data
    pairs = dataset.train.text_pairs is not None
    header = [d.text_column, *([d.text_pair_column or "text_pair"] if pairs else []), d.label_column]
    folders = []
    for c in clients:
        site = Path(out_dir) / f"site{c.client}"
        site.mkdir(parents=True, exist_ok=True)
        for split, indices, pool in (
            ("train", c.train_indices, dataset.train),
            ("validation", c.val_indices, dataset.validation),
        ):
            with open(site / f"{split}.csv", "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(header)
                for i in indices:
                    pair = [pool.text_pairs[i]] if pool.text_pairs is not None else []
                    writer.writerow([pool.texts[i], *pair, pool.label_names[pool.labels[i]]])
        folders.append(site)
    return folders
