"""benchmarks/bench_regime.py: its signal measures against hand-computed numbers and planted B matrices."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from fedtreelora.suites import load_suite

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_regime  # noqa: E402


def test_between_within_ratio_by_hand() -> None:
    # Clients 0, 1 in one group, 2, 3 in the other. Within: d01 = 1, d23 = 3 (mean 2);
    # between: d02 = 4, d03 = 6, d12 = 8, d13 = 10 (mean 7); ratio 3.5.
    d = np.zeros((4, 4))
    for (i, j), v in {(0, 1): 1, (2, 3): 3, (0, 2): 4, (0, 3): 6, (1, 2): 8, (1, 3): 10}.items():
        d[i, j] = d[j, i] = v
    assert bench_regime.between_within_ratio(d, np.array([0, 0, 1, 1])) == pytest.approx(3.5)


def test_planted_groups_in_b_are_found_and_noise_is_not() -> None:
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(3), 4)  # 12 clients, 3 groups of 4
    shape = (12, 4, 2, 6, 2)  # clients, layers, modules, d_out, rank
    centres = rng.normal(size=(3, *shape[1:]))
    planted = bench_regime.weight_signal(centres[groups] + 0.3 * rng.normal(size=shape), groups)
    assert planted.tree_ari == pytest.approx(1.0)
    assert min(planted.silhouette_frobenius) > 0.5 and min(planted.ratio) > 2.0
    assert planted.plan_ari["0.0"] == pytest.approx(1.0)
    noise = bench_regime.weight_signal(rng.normal(size=shape), groups)
    assert max(noise.silhouette_frobenius) < 0.2 and max(abs(r - 1.0) for r in noise.ratio) < 0.2


def test_b_stack_orders_layers_and_modules_from_saved_keys() -> None:
    def key(layer: int, module: str) -> str:
        return f"bert.encoder.layer.{layer}.attention.self.{module}.local.lora_B"

    state = {
        key(lay, m): np.full((3, 2), 10 * lay + (m == "value"), dtype=np.float32)
        for lay in (0, 1, 10)
        for m in ("query", "value")
    }
    state |= {k.replace("lora_B", "lora_A"): np.zeros((2, 3), dtype=np.float32) for k in list(state)}
    b = bench_regime.b_stack([state, state])
    assert b.shape == (2, 3, 2, 3, 2)
    assert b[0, :, 0, 0, 0].tolist() == [0, 10, 100] and b[0, :, 1, 0, 0].tolist() == [1, 11, 101]


def test_the_regime_suite_loads_and_every_row_is_a_local_run() -> None:
    suite = load_suite("regime")
    assert set(suite.methods) == set(suite.variants)
    assert all(method == "local" for method, _ in suite.variants.values())
