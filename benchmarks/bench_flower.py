"""What Flower's simulation engine costs against the in-process engine, for the same workload.

    python benchmarks/bench_flower.py [--clients 10] [--layers 6] [--n-train 64] [--rounds 2 6]

Each engine runs the same experiment (installed MiniLM, real sarcasm data, FedIT) at two run lengths;
the difference gives the cost per round with start-up removed (Flower: a SuperLink, ``flwr run``, Ray
workers, one backbone per worker; in-process: one backbone). Both produce the same metrics (checked
here too). Ratios are Flower / in-process, measured side by side in one run of this script.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from fedtreelora.config import load_config
from fedtreelora.engines import SimulationEngine
from fedtreelora.engines.flower.launch import simulate


def config(args: argparse.Namespace, rounds: int):  # type: ignore[no-untyped-def]
    return load_config(
        overrides=[
            f"data.num_clients={args.clients}",
            f"model.num_layers={args.layers}",
            f"data.n_train={args.n_train}",
            f"data.n_val={args.n_train // 2}",
            f"federation.rounds={rounds}",
            "train.local_epochs=1",
            "federation.checkpoint_every=0",
            "logging.tensorboard=false",
        ],
        method="fedit",
    )


def timed(fn) -> tuple[float, dict]:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    summary = fn()
    return time.perf_counter() - start, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--rounds", type=int, nargs=2, default=(2, 6))
    args = parser.parse_args()
    short, long = args.rounds
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rounds in (short, long):
            cfg = config(args, rounds)
            in_dir, fl_dir = Path(tmp) / f"in-{rounds}", Path(tmp) / f"fl-{rounds}"
            t_in, s_in = timed(lambda c=cfg, d=in_dir: SimulationEngine(c, d, quiet=True, report=False).run())
            t_fl, s_fl = timed(lambda c=cfg, d=fl_dir: simulate(c, d, echo=False))
            assert s_in["per_client"] == s_fl["per_client"], "the two engines disagree"
            rows[rounds] = (t_in, t_fl)
            print(
                json.dumps({"rounds": rounds, "in_process_s": round(t_in, 2), "flower_s": round(t_fl, 2)}), flush=True
            )
    (in_s, fl_s), (in_l, fl_l) = rows[short], rows[long]
    per_in, per_fl = (in_l - in_s) / (long - short), (fl_l - fl_s) / (long - short)
    print()
    print(f"FedIT, MiniLM {args.layers} layers, {args.clients} clients x {args.n_train} examples, 1 local epoch")
    print()
    print("| measurement | in-process | Flower simulation | Flower / in-process |")
    print("|---|---|---|---|")
    print(f"| whole run, {short} rounds (s) | {in_s:.1f} | {fl_s:.1f} | {fl_s / in_s:.2f} |")
    print(f"| whole run, {long} rounds (s) | {in_l:.1f} | {fl_l:.1f} | {fl_l / in_l:.2f} |")
    print(f"| per round, start-up removed (s) | {per_in:.2f} | {per_fl:.2f} | {per_fl / per_in:.2f} |")
    print(f"| start-up (whole run minus rounds) (s) | {in_s - short * per_in:.1f} | {fl_s - short * per_fl:.1f} | |")


if __name__ == "__main__":
    main()
