"""Server planning cost: distances, tree, cuts and expert averaging for N clients at real adapter shapes.

    python benchmarks/bench_planning.py [--clients 20 100 1000] [--backend numpy|torch] [--device cpu|cuda]

Shapes (LoRA on two projections per layer): RoBERTa-large 24 layers, d 1024, rank 4; LLaMA-7B 32 layers,
d 4096, rank 8. Work is done the way the FedTreeLoRA strategy does it: distances from every client's B
(one Gram matrix per layer and module), one tree, the layer-wise cut search, then cluster and external
means for every A and B tensor. Where all clients' tensors at once exceed memory, the script streams
layer by layer (as stated in its output). ``--backend torch`` passes float64 torch tensors on
``--device`` (what a strategy does under ``federation.server_device``), which the core computes on
that device; numpy computes in float64 on the CPU. Expert times include copying every client's
cluster and external expert back to the host as float32, as the server sends them.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fedtreelora.core import group_means, layer_distances, plan_sharing

SHAPES = {"roberta-large": (24, 1024, 1024, 4), "llama-7b": (32, 4096, 4096, 8)}
MODULES = 2


def bench(
    name: str, n: int, rng: np.random.Generator, budget_gb: float, backend: str = "numpy", device: str = "cpu"
) -> dict[str, float]:
    layers, d_out, d_in, rank = SHAPES[name]
    per_layer_gb = n * MODULES * (d_out * rank + rank * d_in) * 4 / 1e9
    streamed = per_layer_gb * layers > budget_gb
    t_dist = t_expert = 0.0
    distances = np.zeros((layers, n, n))
    labels_shape = (layers, n)
    blocks = []  # B of one layer at a time when streaming, else kept for the expert step
    for layer in range(layers):
        b = [
            to_backend(rng.standard_normal((n, 1, d_out, rank), dtype=np.float32), backend, device)
            for _ in range(MODULES)
        ]
        sync(device)
        t0 = time.perf_counter()
        distances[layer] = layer_distances(b)[0]
        t_dist += time.perf_counter() - t0
        if not streamed:
            blocks.append(b)
    t0 = time.perf_counter()
    plan = plan_sharing(distances, tau=0.0, window=3)
    t_plan = time.perf_counter() - t0
    assert plan.labels.shape == labels_shape
    for layer in range(layers):
        b = (
            blocks[layer]
            if not streamed
            else [
                to_backend(rng.standard_normal((n, 1, d_out, rank), dtype=np.float32), backend, device)
                for _ in range(MODULES)
            ]
        )
        a = [
            to_backend(rng.standard_normal((n, rank, d_in), dtype=np.float32), backend, device) for _ in range(MODULES)
        ]
        sync(device)
        t0 = time.perf_counter()
        for m in range(MODULES):
            for values in (b[m][:, 0], a[m]):
                inside, outside = group_means(values, plan.labels[layer])
                # What the server sends: every client's two experts back on the host as float32.
                to_host(inside), to_host(outside)
        t_expert += time.perf_counter() - t0
    return {
        "distances": t_dist,
        "tree_and_cuts": t_plan,
        "experts": t_expert,
        "streamed": streamed,
        "cuts": plan.cuts.max(),
    }


def to_backend(x: np.ndarray, backend: str, device: str) -> np.ndarray | torch.Tensor:
    """Numpy stays float32 (the core widens to float64); torch goes to ``device`` in float64, as the
    strategies stack uploads under ``federation.server_device``."""
    return torch.from_numpy(x).to(device).double() if backend == "torch" else x


def to_host(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    return x.to(device="cpu", dtype=torch.float32) if isinstance(x, torch.Tensor) else torch.from_numpy(x).float()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[20, 100, 1000])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--memory-budget-gb", type=float, default=6.0)
    parser.add_argument("--backend", choices=["numpy", "torch"], default="numpy")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"backend {args.backend}, device {args.device}")
    print("| shape | clients | distances s | tree + cuts s | experts s | total s | streamed |")
    print("|---|---|---|---|---|---|---|")
    for name in args.shapes:
        for n in args.clients:
            r = bench(name, n, rng, args.memory_budget_gb, args.backend, args.device)
            total = r["distances"] + r["tree_and_cuts"] + r["experts"]
            print(
                f"| {name} | {n} | {r['distances']:.2f} | {r['tree_and_cuts']:.2f} | {r['experts']:.2f} | {total:.2f} | "
                f"{'yes' if r['streamed'] else 'no'} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
