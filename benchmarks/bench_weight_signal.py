"""Do the clients' adapters carry the planted groups? Silhouettes of the planted partition in weight space.

FedTreeLoRA (and FedLEASE) cluster clients on distances between their LoRA weights, so they can only
find groups that the weights show. For a finished run on a federation with planted groups
(``data.groups``) whose final client adapters were saved (``clients/client_K.safetensors``, e.g. a
``local`` run), this prints, per layer and per hierarchy depth, the mean silhouette of the planted
partition under the layer's distance between clients, computed on B (what FedTreeLoRA compares), on A
and on the full update B A, each with the Frobenius and the cosine distance (mean over the layer's
modules, as the method does). Values near 0 mean the weights do not separate the groups; 1 means tight,
well separated groups.

    python benchmarks/bench_weight_signal.py runs/nlu-cpu/runs/hierarchy/local/seed0
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from sklearn.metrics import silhouette_score

from fedtreelora.runfolder import RunFolder

LAYER = re.compile(r"\.(?:layer|layers|h)\.(\d+)\.")


def pairwise(vectors: np.ndarray, kind: str) -> np.ndarray:
    """(clients, clients) distances between the rows of ``vectors`` (clients, features)."""
    if kind == "cosine":
        unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        dist = 1.0 - unit @ unit.T
    else:
        dist = np.linalg.norm(vectors[:, None, :] - vectors[None, :, :], axis=2)
    np.fill_diagonal(dist, 0.0)
    return np.maximum(dist, 0.0)


def layer_distances(states: list[dict[str, np.ndarray]], factor: str, kind: str) -> dict[int, np.ndarray]:
    """Layer -> (clients, clients) mean over the layer's modules of the distance on ``factor``
    (``B``, ``A`` or ``BA``, the update)."""
    by_layer: dict[int, list[np.ndarray]] = {}
    for key_b in sorted(k for k in states[0] if k.endswith("lora_B")):
        match = LAYER.search(key_b)
        if match is None:
            continue
        key_a = key_b[: -len("lora_B")] + "lora_A"
        if factor == "B":
            rows = [s[key_b].ravel() for s in states]
        elif factor == "A":
            rows = [s[key_a].ravel() for s in states]
        else:
            rows = [(s[key_b] @ s[key_a]).ravel() for s in states]
        by_layer.setdefault(int(match.group(1)), []).append(pairwise(np.stack(rows), kind))
    return {layer: np.mean(mats, axis=0) for layer, mats in sorted(by_layer.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished run folder with planted groups and clients/")
    args = parser.parse_args()
    folder = RunFolder(args.run)
    levels = folder.require_run_summary().planted_levels
    if not levels:
        raise SystemExit(f"{args.run}: summary.json has no planted_levels (a run without data.groups)")
    files = folder.client_state_files()
    if len(files) != len(levels[0]):
        raise SystemExit(f"{args.run}: {len(files)} saved client states for {len(levels[0])} clients")
    states = [load_file(str(f)) for f in files]
    partitions = [np.unique(np.asarray(names), return_inverse=True)[1] for names in levels]
    columns = [(f, k) for f in ("B", "A", "BA") for k in ("frobenius", "cosine")]
    print(f"{args.run}: silhouette of the planted partition, per layer; columns factor/distance, depth")
    print("| layer | " + " | ".join(f"{f}/{k} d{d + 1}" for f, k in columns for d in range(len(levels))) + " |")
    print("|---|" + "---:|" * (len(columns) * len(levels)))
    tables = {(f, k): layer_distances(states, f, k) for f, k in columns}
    for layer in tables[columns[0]]:
        cells = []
        for column in columns:
            dist = tables[column][layer]
            for labels in partitions:
                ok = 1 < labels.max() + 1 < len(labels)
                cells.append(f"{silhouette_score(dist, labels, metric='precomputed'):+.3f}" if ok else "n/a")
        print(f"| {layer + 1} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
