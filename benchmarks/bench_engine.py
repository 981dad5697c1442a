"""Engine speed: vectorised clients against one client at a time, and the federation's overhead.

    python benchmarks/bench_engine.py [--clients 10] [--batch 16] [--steps 4] [--layers 6] [--rounds 2]

Both measurements use the installed MiniLM on real sarcasm data and the same work: every client trains
``steps`` local steps of ``batch`` examples per round and evaluates on its validation split.

1. Rounds per second of the in-process engine with ``train.clients_per_pass=1`` and with every client
   in one pass (ratio reported).
2. Federation overhead: a round's wall time (FedTreeLoRA federated round: payloads, slot swaps,
   training, evaluation, upload checks, aggregation) against a tight loop that trains and evaluates
   the same clients on the same batches with one resident adapter and nothing else.
3. Memory per simulated client: the bytes of its resident adapter state, and on a GPU the peak memory
   of a vectorised round above the model's own, divided by the clients in the pass.

The tight loop runs under the engine's precision (bf16 autocast on a GPU by default), so the ratio
compares like with like. ``--compile`` adds ``train.compile=true`` to the engine runs.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fedtreelora.config import load_config
from fedtreelora.engines import SimulationEngine, build_federation
from fedtreelora.engines.setup import client_seed
from fedtreelora.train.batches import eval_batches, train_batches
from fedtreelora.train.client import make_optimizer
from fedtreelora.train.metrics import evaluate_classifier
from fedtreelora.train.precision import precision_context


def overrides(args: argparse.Namespace, per_pass: int) -> list[str]:
    return [
        f"model.num_layers={args.layers}",
        f"data.num_clients={args.clients}",
        f"data.n_train={args.batch * args.steps}",
        f"data.n_val={args.batch * 2}",
        f"train.batch_size={args.batch}",
        f"train.eval_batch_size={args.batch}",
        "train.local_epochs=1",
        f"federation.rounds={args.rounds + 1}",
        "fedtreelora.warmup_rounds=1",
        f"train.clients_per_pass={per_pass}",
        "federation.checkpoint_every=0",
        *(["train.compile=true"] if args.compile else []),
    ]


def engine_round_seconds(args: argparse.Namespace, per_pass: int) -> tuple[float, float]:
    """Mean wall seconds of the federated rounds (the first, warm-up round also warms caches), and the
    peak CUDA memory of the run in bytes (0 on CPU)."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    engine = SimulationEngine(load_config(overrides=overrides(args, per_pass)), quiet=True)
    stamps: list[float] = []
    original = engine._round

    def timed(*a, **k):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        out = original(*a, **k)
        stamps.append(time.perf_counter() - t0)
        return out

    engine._round = timed  # type: ignore[method-assign]
    engine.run()
    return float(np.mean(stamps[1:])), float(torch.cuda.max_memory_allocated()) if cuda else 0.0


def tight_loop_seconds(args: argparse.Namespace) -> float:
    """The same clients' training and evaluation, one resident adapter, no federation machinery."""
    fed = build_federation(load_config(overrides=overrides(args, 1)))
    params = fed.bank.configure(fed.strategy.phase(1))
    fed.bank.write_slot(0, fed.initial_state)
    batches = [
        [
            {key: v.to(fed.device) for key, v in batch.items()}  # on the device up front: no copies timed
            for batch in train_batches(fed.classifier.tokenizer, fed.train_data[k], batch_size=args.batch, epochs=1,
                                       steps=None, rng=np.random.default_rng(client_seed(0, 1, k)))
        ]
        for k in range(args.clients)
    ]  # fmt: skip
    model = fed.classifier.model
    times = []
    with precision_context(fed.device, fed.settings.precision):
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            for k in range(args.clients):
                optimizer = make_optimizer(fed.bank, params, fed.settings)
                model.train()
                for batch in batches[k]:
                    model(**batch).loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                evaluate_classifier(
                    model, eval_batches(fed.classifier.tokenizer, fed.val_data[k], args.batch), fed.device
                )
            times.append(time.perf_counter() - t0)
    return float(np.mean(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="engine runs with train.compile=true")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {'cuda' if torch.cuda.is_available() else 'cpu'}"
    )
    print(f"MiniLM {args.layers} layers, {args.clients} clients x {args.steps} steps x batch {args.batch} per round\n")
    one, _ = engine_round_seconds(args, 1)
    together, peak = engine_round_seconds(args, args.clients)
    tight = tight_loop_seconds(args)
    fed = build_federation(load_config(overrides=overrides(args, 1)))
    state_bytes = sum(t.numel() * 4 for t in fed.initial_state.values())
    model_bytes = sum(t.numel() * t.element_size() for t in fed.classifier.model.state_dict().values())
    print("| measurement | value |")
    print("|---|---|")
    print(f"| round, one client at a time (s) | {one:.3f} |")
    print(f"| round, {args.clients} clients per pass (s) | {together:.3f} |")
    print(f"| vectorised speed-up (one-at-a-time / vectorised) | {one / together:.2f}x |")
    print(f"| tight loop, same training and evaluation (s) | {tight:.3f} |")
    print(f"| federation overhead (engine round / tight loop, one at a time) | {one / tight:.3f} |")
    print(f"| resident adapter state per client (MB) | {state_bytes / 1e6:.3f} |")
    if peak:
        per_client = (peak - model_bytes) / args.clients
        print(
            f"| peak GPU memory of a {args.clients}-client pass, above the model, per client (MB) | {per_client / 1e6:.1f} |"
        )


if __name__ == "__main__":
    main()
