"""What secure aggregation (``privacy.secure_aggregation``, Flower's SecAgg+) costs against plain uploads,
for the same workload in Flower's simulation engine.

    python benchmarks/bench_secure_aggregation.py [--clients 6] [--layers 4] [--n-train 32] [--rounds 4]

Each method runs twice, plain and secure, side by side in one run of this script (installed MiniLM, real
sarcasm data, 1 local epoch). Reported: the upload per client and round (float32 upload against the
int64 masked vector, from ``metrics.jsonl``; SecAgg+'s key exchange messages are not counted), the
whole run's time and the time each secure round adds. FedTreeLoRA runs with ``tau -1`` so that layers
split into clusters and the slots' cost shows (a vector holds each layer's upload once per cluster).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedtreelora.config import ExperimentConfig, load_config
from fedtreelora.engines.flower.launch import simulate


def config(args: argparse.Namespace, method: str, secure: bool) -> ExperimentConfig:
    overrides = [
        f"data.num_clients={args.clients}",
        f"model.num_layers={args.layers}",
        f"data.n_train={args.n_train}",
        f"data.n_val={args.n_train // 2}",
        f"federation.rounds={args.rounds}",
        "train.local_epochs=1",
        "federation.checkpoint_every=0",
        "logging.tensorboard=false",
        f"privacy.secure_aggregation={str(secure).lower()}",
    ]
    if method == "fedtreelora":
        overrides += ["fedtreelora.warmup_rounds=1", "fedtreelora.tau=-1"]
    return load_config(overrides=overrides, method=method)


def uplink(run: Path, secure_rounds: list[int]) -> float:
    """Mean bytes a client sent per round over ``secure_rounds``."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    return float(np.mean([r["uplink_bytes"] for r in records if r["round"] in secure_rounds and "uplink_bytes" in r]))


def measure(args: argparse.Namespace, method: str, tmp: Path) -> dict[str, Any]:
    warmup = 1 if method == "fedtreelora" else 0
    secure_rounds = list(range(warmup, args.rounds))
    row: dict[str, Any] = {"method": method}
    for mode in ("plain", "secure"):
        out = tmp / f"{method}-{mode}"
        start = time.perf_counter()
        summary = simulate(config(args, method, mode == "secure"), out, echo=False)
        row[f"{mode}_s"] = time.perf_counter() - start
        row[f"{mode}_bytes"] = uplink(out, secure_rounds)
        row["cuts"] = summary.get("cuts")
    row["secure_rounds"] = len(secure_rounds)
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--n-train", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--methods", nargs="+", default=["fedit", "fedtreelora"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(args, method, Path(tmp)) for method in args.methods]
    print()
    print(f"MiniLM {args.layers} layers, {args.clients} clients x {args.n_train} examples, {args.rounds} rounds")
    print()
    print(
        "| method | clusters per layer | upload plain (kB) | secure (kB) | ratio | run plain (s) | secure (s) | ratio | added per secure round (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        added = (r["secure_s"] - r["plain_s"]) / r["secure_rounds"]
        print(
            f"| {r['method']} | {r['cuts']} | {r['plain_bytes'] / 1e3:.1f} | {r['secure_bytes'] / 1e3:.1f} | "
            f"{r['secure_bytes'] / r['plain_bytes']:.2f} | {r['plain_s']:.1f} | {r['secure_s']:.1f} | "
            f"{r['secure_s'] / r['plain_s']:.2f} | {added:.2f} |"
        )


if __name__ == "__main__":
    main()
