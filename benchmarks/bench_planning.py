"""Server planning cost: distances, tree, cuts and expert averaging for N clients at real adapter shapes.

    python benchmarks/bench_planning.py [--clients 20 100 1000] [--backend numpy|torch] [--device cpu|cuda]
    python benchmarks/bench_planning.py --compare [--clients 8 20 100] [--repeats 9]

Shapes (LoRA on two projections per layer): RoBERTa-large 24 layers, d 1024, rank 4; LLaMA-7B 32 layers,
d 4096, rank 8. Work is done the way the FedTreeLoRA strategy does it: distances from every client's B
(one Gram matrix per layer and module), one tree, the layer-wise cut search, then cluster and external
means for every A and B tensor. Where all clients' tensors at once exceed memory, the script streams
layer by layer (as stated in its output). ``--backend torch`` passes float64 torch tensors on
``--device`` (what a strategy does under ``federation.server_device``), which the core computes on
that device; numpy computes in float64 on the CPU. Expert times include copying every client's
cluster and external expert back to the host as float32, as the server sends them.

``--compare`` times numpy against torch float64 on the CPU side by side in one process, the two
alternating on the same inputs ``--repeats`` times, for the distances of all layers and the expert
averages of every A and B (one layer's inputs at a time, as above, copies to float32 included), and
prints the medians and the median ratio torch / numpy (less noisy than two separate runs).
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


def compare(name: str, n: int, rng: np.random.Generator, repeats: int) -> dict[str, tuple[float, float, float]]:
    """Median seconds of numpy and of torch-CPU float64, and the median ratio torch / numpy, per step."""
    layers, d_out, d_in, rank = SHAPES[name]
    b = [rng.standard_normal((n, layers, d_out, rank), dtype=np.float32) for _ in range(MODULES)]
    a = [rng.standard_normal((n, layers, rank, d_in), dtype=np.float32) for _ in range(MODULES)]
    labels = rng.integers(0, max(2, n // 4), size=n)

    def distances(backend: str) -> None:
        layer_distances([to_backend(x, backend, "cpu") for x in b])

    def experts(backend: str) -> None:
        for layer in range(layers):
            for x in (*a, *b):
                inside, outside = group_means(to_backend(x[:, layer], backend, "cpu"), labels)
                to_host(inside), to_host(outside)

    out = {}
    for step, run in (("distances", distances), ("experts", experts)):
        run("numpy"), run("torch")  # warm-up
        seconds: dict[str, list[float]] = {"numpy": [], "torch": []}
        for _ in range(repeats):
            for backend in seconds:
                t0 = time.perf_counter()
                run(backend)
                seconds[backend].append(time.perf_counter() - t0)
        ratios = np.array(seconds["torch"]) / np.array(seconds["numpy"])
        out[step] = (float(np.median(seconds["numpy"])), float(np.median(seconds["torch"])), float(np.median(ratios)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[20, 100, 1000])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--memory-budget-gb", type=float, default=6.0)
    parser.add_argument("--backend", choices=["numpy", "torch"], default="numpy")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compare", action="store_true", help="numpy against torch-CPU float64, side by side")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    if args.compare:
        print(
            f"numpy {np.__version__} against torch {torch.__version__} float64 on the CPU, {torch.get_num_threads()} threads"
        )
        print("| shape | clients | step | numpy ms | torch ms | torch / numpy |")
        print("|---|---|---|---|---|---|")
        for name in args.shapes:
            for n in args.clients:
                for step, (t_numpy, t_torch, ratio) in compare(name, n, rng, args.repeats).items():
                    print(
                        f"| {name} | {n} | {step} | {t_numpy * 1e3:.1f} | {t_torch * 1e3:.1f} | {ratio:.2f} |",
                        flush=True,
                    )
        return
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
