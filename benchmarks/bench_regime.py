"""Which warm-up regime makes the clients' adapters carry their planted groups?

FedTreeLoRA builds its tree from the clients' B matrices after warm-up (local training), so it can only
find groups that those matrices show, and only if the clients learned their task. For every finished
``local`` run of a comparison folder on a federation with planted groups (``data.groups``; the
``regime`` suite runs them: ``fedtreelora compare --suite regime --out runs/regime``), this prints one
row per run with

- whether the task is learned: mean accuracy over clients against the mean majority rate of their
  validation splits, and the mean training loss of the first and the last round (and how many clients
  ended with a training loss above 0.65, i.e. at chance for two classes);
- per layer, the silhouette of the deepest planted partition under B/Frobenius (the method's distance)
  and B/cosine (the paper's variant), and the ratio of the mean between-group to the mean within-group
  B/Frobenius distance;
- the ARI against the planted groups of the one tree's cut at the planted number of groups (the tree the
  method builds: average linkage on the layer-mean B/Frobenius distance), and of the plan the method
  would choose at several tau (window 2, the default), at the deepest layer.

    python benchmarks/bench_regime.py runs/regime            # tables of every run under runs/regime
    python benchmarks/bench_regime.py runs/regime --markdown regime.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from sklearn.metrics import adjusted_rand_score, silhouette_score

from fedtreelora.compare.stats import majority_rate
from fedtreelora.core.distances import layer_distances
from fedtreelora.core.plan import plan_sharing
from fedtreelora.core.tree import build_tree, cut_exact
from fedtreelora.runfolder import ComparisonFolder, RunFolder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_weight_signal import LAYER  # noqa: E402  (one pattern for a key's layer index)

TAUS: tuple[float | str, ...] = (0.0, 0.05, 0.1, 0.3, "auto")
CHANCE_LOSS = 0.65  # two balanced classes: ln 2 = 0.693 is a model that learned nothing


def b_stack(states: list[dict[str, np.ndarray]]) -> np.ndarray:
    """(clients, layers, modules, d_out, rank) B matrices of saved client states (keys ``...lora_B``,
    layers in key order, the same modules in every layer)."""
    keys = sorted(k for k in states[0] if k.endswith("lora_B") and LAYER.search(k))
    layer_of = [int(LAYER.search(k).group(1)) for k in keys]  # type: ignore[union-attr]
    layers = sorted(set(layer_of))
    per_layer = [[k for k, lay in zip(keys, layer_of, strict=True) if lay == layer] for layer in layers]
    return np.stack([np.stack([np.stack([s[k] for k in mods]) for mods in per_layer]) for s in states]).astype(
        np.float64
    )


def between_within_ratio(distances: np.ndarray, groups: np.ndarray) -> float:
    """Mean distance between clients of different groups over the mean distance within a group.

    Args:
        distances: (clients, clients) symmetric, zero diagonal.
        groups: (clients,) int labels with at least one group of two or more clients.
    """
    same = groups[:, None] == groups[None, :]
    off = ~np.eye(len(groups), dtype=bool)
    return float(distances[~same].mean() / distances[same & off].mean())


@dataclass
class Signal:
    """What one run's adapters show. Per-layer lists run shallow to deep."""

    silhouette_frobenius: list[float]
    silhouette_cosine: list[float]
    ratio: list[float]
    tree_ari: float
    tree_ari_cosine: float
    plan_cuts: dict[str, list[int]]
    plan_ari: dict[str, float]


def weight_signal(b: np.ndarray, groups: np.ndarray, window: int = 2) -> Signal:
    """The planted partition's signal in the clients' B matrices.

    Args:
        b: (clients, layers, modules, d_out, rank).
        groups: (clients,) int, the planted partition to look for.
        window: the plan's window for :attr:`Signal.plan_cuts`.
    """
    frob = layer_distances(b, "frobenius")
    cos = layer_distances(b, "cosine")
    k = int(groups.max()) + 1
    n = len(groups)
    tree = build_tree(frob.mean(axis=0))
    plans = {str(t): plan_sharing(frob, t, window) for t in TAUS}
    return Signal(
        silhouette_frobenius=[float(silhouette_score(d, groups, metric="precomputed")) for d in frob],
        silhouette_cosine=[float(silhouette_score(d, groups, metric="precomputed")) for d in cos],
        ratio=[between_within_ratio(d, groups) for d in frob],
        tree_ari=float(adjusted_rand_score(groups, cut_exact(tree, n, k))),
        tree_ari_cosine=float(adjusted_rand_score(groups, cut_exact(build_tree(cos.mean(axis=0)), n, k))),
        plan_cuts={t: p.cuts.tolist() for t, p in plans.items()},
        plan_ari={t: float(adjusted_rand_score(groups, p.labels[-1])) for t, p in plans.items()},
    )


def learned(run: Path) -> dict[str, float]:
    """Accuracy, majority rate and training losses of a finished run."""
    folder = RunFolder(run)
    summary = folder.require_run_summary()
    partition = folder.read_partition()
    if partition is None:
        raise SystemExit(f"{run}: no partition.json")
    if summary.final_mean is None:
        raise SystemExit(f"{run}: summary.json has no final mean")
    majority = majority_rate(partition)
    losses = [(r.round, r.train_loss) for r in folder.read_client_records() if r.train_loss is not None]
    last = max(rnd for rnd, _ in losses)
    first_loss = statistics.mean(loss for rnd, loss in losses if rnd == 0)
    last_losses = [loss for rnd, loss in losses if rnd == last]
    return {
        "accuracy": summary.final_mean,
        "majority": majority,
        "loss_first": first_loss,
        "loss_last": statistics.mean(last_losses),
        "at_chance": sum(loss > CHANCE_LOSS for loss in last_losses),
        "clients": len(last_losses),
    }


def analyse(run: Path) -> tuple[dict[str, float], Signal]:
    folder = RunFolder(run)
    levels = folder.require_run_summary().planted_levels
    if not levels:
        raise SystemExit(f"{run}: summary.json has no planted_levels (a run without data.groups)")
    files = folder.client_state_files()  # client order: the names are zero-padded
    groups = np.unique(np.asarray(levels[-1]), return_inverse=True)[1]
    return learned(run), weight_signal(b_stack([load_file(str(f)) for f in files]), groups)


def render(results: dict[str, tuple[dict[str, float], Signal]]) -> str:
    lines = [
        "| run | acc | majority | loss r1 -> last | at chance | sil B/frob per layer | sil B/cos per layer "
        "| between/within per layer | tree ARI frob / cos | cuts tau 0.1 | cuts auto | ARI deepest: tau 0 / 0.05 / 0.1 / 0.3 / auto |",
        "|---|---:|---:|---|---:|---|---|---|---|---|---|---|",
    ]

    def per_layer(values: list[float], fmt: str = "+.2f") -> str:
        return " ".join(format(v, fmt) for v in values)

    for name, (fit, sig) in results.items():
        lines.append(
            f"| {name} | {100 * fit['accuracy']:.1f} | {100 * fit['majority']:.1f} "
            f"| {fit['loss_first']:.3f} -> {fit['loss_last']:.3f} | {fit['at_chance']}/{fit['clients']} "
            f"| {per_layer(sig.silhouette_frobenius)} | {per_layer(sig.silhouette_cosine)} "
            f"| {per_layer(sig.ratio, '.2f')} | {sig.tree_ari:.2f} / {sig.tree_ari_cosine:.2f} "
            f"| {','.join(map(str, sig.plan_cuts['0.1']))} | {','.join(map(str, sig.plan_cuts['auto']))} "
            f"| {' / '.join(f'{sig.plan_ari[str(t)]:.2f}' for t in TAUS)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("out", type=Path, help="a comparison folder (runs/<dataset>/<method>/seed<k>/)")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    results = {}
    for dataset, method, seed, folder in ComparisonFolder(args.out).runs():
        if not folder.clients_dir.is_dir() or not folder.require_run_summary().planted_levels:
            continue
        results[f"{dataset} {method} seed{seed}"] = analyse(folder.root)
    text = render(results)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
