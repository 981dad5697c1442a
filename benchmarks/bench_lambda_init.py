"""What a FedTreeLoRA client receives right after the tree is built, for several initial lambdas.

Runs the warm-up of an experiment (default: the default experiment's 3 warm-up rounds), then scores,
without any further training, the model each client receives after the tree is built (its warm-up
state plus its cluster and external experts) with lambda set to each value of ``--lambdas`` on the
layers that have branches (trunk layers use the cluster expert alone). Also scores each client's own
warm-up LoRA (what it held the moment before) and FedIT's received model (the global average of the
warm-up LoRAs at every layer), all on each client's own validation split.

    python benchmarks/bench_lambda_init.py --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import tempfile
from pathlib import Path

import torch

from fedtreelora.compare.stats import mean_std
from fedtreelora.config import load_config
from fedtreelora.engines import SimulationEngine
from fedtreelora.engines.checkpoint import load_checkpoint
from fedtreelora.engines.setup import build_federation, client_seed
from fedtreelora.train.received import evaluate_received


def logit(p: float) -> float:
    """The mix logit of lambda ``p`` (1 maps to a logit whose sigmoid is 1 in float32)."""
    return 30.0 if p >= 1.0 else math.log(p / (1.0 - p))


def reading(seed: int, lambdas: list[float], overrides: list[str]) -> dict[str, float]:
    """Mean accuracy over clients of each received model after the warm-up of ``seed``."""
    config = load_config(overrides=[*overrides, "method=fedtreelora", f"seed={seed}"])
    warmup = config.fedtreelora.warmup_rounds
    config = config.model_copy(
        update={"federation": config.federation.model_copy(update={"rounds": warmup, "checkpoint_every": 1})}
    )
    with tempfile.TemporaryDirectory() as tmp:
        SimulationEngine(config, tmp, quiet=True, report=False).run()
        fed = build_federation(config)
        run = load_checkpoint(Path(tmp), fed.strategy)
    assert run is not None
    strategy = fed.strategy
    phase = strategy.phase(warmup)
    split = [s for s in fed.bank.sites if s.layer not in phase.single_layers]
    scores: dict[str, list[float]] = {}

    def score(name: str, k: int, state: dict, payload: dict, use_phase) -> None:  # type: ignore[no-untyped-def]
        result = evaluate_received(
            fed.bank, fed.classifier.tokenizer, phase=use_phase, state=state, payload=payload,
            train_data=fed.train_data[k], val_data=fed.val_data[k], settings=fed.settings,
            seed=client_seed(seed, warmup - 1, k), device=fed.device,
        )  # fmt: skip
        scores.setdefault(name, []).append(result["accuracy"])

    own = strategy.phase(0)  # warm-up: the client's own LoRA alone
    everyone = dataclasses.replace(phase, single_layers=frozenset(range(fed.bank.num_layers)))
    for k in range(fed.num_clients):
        state, payload = run.client_states[k], strategy.payload(warmup, k)
        score("own warm-up LoRA", k, state, {}, own)
        fedit = {key: v for key, v in _global_average(run.client_states).items()}
        score("FedIT: global average", k, state, fedit, everyone)
        for lam in lambdas:
            mixed = dict(state)
            for site in split:
                mixed[f"{site.name}.mix_logit"] = torch.tensor(logit(lam))
            score(f"FedTreeLoRA lambda {lam:g}", k, mixed, payload, phase)
    cuts = strategy.plan.cuts.tolist()  # type: ignore[union-attr]
    return {"cuts": cuts, **{name: statistics.mean(values) for name, values in scores.items()}}


def _global_average(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The mean over clients of every cluster-expert factor (what FedIT would send after this warm-up)."""
    keys = [key for key in states[0] if ".cluster." in key]
    return {key: torch.stack([s[key] for s in states]).double().mean(dim=0).float() for key in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--lambdas", default="0.5,0.75,0.9,1.0")
    parser.add_argument("--set", action="append", default=[], help="config override, e.g. data.dataset=tweets")
    args = parser.parse_args()
    lambdas = [float(v) for v in args.lambdas.split(",")]
    results = [reading(int(s), lambdas, args.set) for s in args.seeds.split(",")]
    names = [n for n in results[0] if n != "cuts"]
    print(f"cuts per seed: {[r['cuts'] for r in results]}")
    seeds = args.seeds.split(",")
    print("| received model | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std over seeds |")
    print("|---|" + "---|" * (len(seeds) + 1))
    for name in names:
        values = [r[name] for r in results]
        mean, std = mean_std(values)
        per_seed = " | ".join(f"{100 * v:.2f}" for v in values)
        print(f"| {name} | {per_seed} | {100 * mean:.2f} ± {100 * std:.2f} |")


if __name__ == "__main__":
    main()
