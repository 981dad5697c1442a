"""The Gaussian mechanism on a client's upload: clip the update to an L2 bound, add seeded noise.

One :class:`~fedtreelora.train.upload.UploadTransform`, so it acts wherever a client trains (one client
per pass, several per pass, a Flower node) through the run's upload chain, and only on what is uploaded:
a client's kept state (FedSA's B, FedALT's individual LoRA, a personal expert) is never touched.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from fedtreelora.train.upload import UploadContext

__all__ = ["GaussianUpdate", "noise_seed"]

Tensors = dict[str, torch.Tensor]

_NOISE_STREAM = 0x44500001
"""Mixed into every noise seed so that the noise stream differs from the batch and dropout streams
that share the run seed, round and client."""


def _seed(entropy: list[int]) -> int:
    """A 63-bit seed (what ``torch.Generator.manual_seed`` takes) from non-negative integers."""
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)


def noise_seed(run_seed: int, rnd: int, client: int) -> int:
    """The seed of client ``client``'s noise in round ``rnd`` of a run seeded ``run_seed``: the same
    whichever clients share its pass and whichever machine it trains on."""
    return _seed([run_seed, rnd, client, _NOISE_STREAM])


class GaussianUpdate:
    """Clip a client's update to L2 norm ``clip_norm`` and add N(0, (noise_multiplier * clip_norm)^2) to
    each coordinate; the upload sent is the reference plus the noisy clipped update.

    The update is measured from what the server already knows of each uploaded tensor (the reference):
    the tensor the server sent this round (``context.received``) or, for a tensor it did not send
    (a warm-up round, a client's own expert), the run's shared initialisation ``initial``. Measured
    from the client's kept state instead, the upload would carry that state un-noised.

    The norm is over every uploaded tensor together (flattened into one vector), computed in float64.
    The noise is drawn in float32 on the CPU from a generator seeded by :func:`noise_seed` (run seed,
    round, client), key by key in sorted key order, so an upload is a pure function of the trained
    state, the reference and (run seed, round, client): bit for bit the same in every engine.

    Args:
        clip_norm: S, the L2 bound of one client's update (> 0).
        noise_multiplier: z >= 0; the noise std is z * S (0: clipping alone, no privacy guarantee).
        run_seed: the run's seed (``seed`` of the config).
        initial: every state key -> the run's shared initial tensor (the server builds the same).
    """

    def __init__(
        self, clip_norm: float, noise_multiplier: float, run_seed: int, initial: Mapping[str, torch.Tensor]
    ) -> None:
        if not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
        if not noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.run_seed = int(run_seed)
        self.initial = initial

    @property
    def noise_std(self) -> float:
        """The std of each coordinate's noise: z * S."""
        return self.noise_multiplier * self.clip_norm

    def reference(self, key: str, context: UploadContext) -> torch.Tensor:
        """What the server knows of ``key`` before this upload: the tensor it sent, else the initial one."""
        if key in context.received:
            return context.received[key]
        if key not in self.initial:
            raise KeyError(f"uploaded key {key!r} is neither in the server's payload nor in the initial state")
        return self.initial[key]

    def seed(self, context: UploadContext) -> int:
        """The noise seed of this upload: :func:`noise_seed` of (run seed, round, client); outside an
        engine (no client or round) the client's round seed stands in for both."""
        if context.client is None or context.round is None:
            return _seed([self.run_seed, context.seed, _NOISE_STREAM, 1])
        return noise_seed(self.run_seed, context.round, context.client)

    def noise(self, shapes: Mapping[str, torch.Size], seed: int) -> Tensors:
        """The noise added to an upload of these shapes under ``seed``: float32 CPU tensors, std z * S,
        drawn in sorted key order."""
        generator = torch.Generator(device="cpu").manual_seed(seed)
        return {
            key: torch.randn(shapes[key], generator=generator, dtype=torch.float32) * self.noise_std
            for key in sorted(shapes)
        }

    @staticmethod
    def norm(update: Mapping[str, torch.Tensor]) -> float:
        """The L2 norm of every tensor of ``update`` together (float64)."""
        return math.sqrt(sum(float(t.double().square().sum()) for t in update.values()))

    def clip_factor(self, norm: float) -> float:
        """min(1, S / norm): what the update is multiplied by (1 for a zero update)."""
        return 1.0 if norm <= self.clip_norm else self.clip_norm / norm

    def __call__(self, upload: Tensors, context: UploadContext) -> Tensors:
        if not upload:
            return upload
        reference = {key: self.reference(key, context) for key in upload}
        update = {key: value - reference[key] for key, value in upload.items()}
        factor = self.clip_factor(self.norm(update))
        noise = self.noise({key: value.shape for key, value in upload.items()}, self.seed(context))
        out = {}
        for key, value in update.items():
            clipped = value * factor if factor < 1.0 else value
            out[key] = (reference[key] + (clipped + noise[key].to(value.device, value.dtype))).to(upload[key].dtype)
        return out
