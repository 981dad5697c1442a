"""FedDPA's instance-wise dynamic weighting: a client's evaluation that mixes its global and local
adapters with a weight of its own for every validation instance.

It runs the model on the client's data, so it lives with the training code; the FedDPA strategy only
chooses and configures it (:attr:`fedtreelora.adapters.PhaseSpec.evaluate`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedtreelora.adapters import AdapterBank, MultiClientLoraLinear
from fedtreelora.train.batches import EncodedExamples, eval_batches
from fedtreelora.train.generation import EncodedInstructions, iterate_prompts
from fedtreelora.train.metrics import evaluate_client
from fedtreelora.train.settings import LocalTraining


@dataclass(frozen=True)
class InstanceWeighting:
    """FedDPA's instance-wise dynamic weighting, as a :attr:`PhaseSpec.evaluate` hook
    (a :class:`~fedtreelora.train.evaluator.ClientEvaluator`).

    For a test instance x with representation e(x) (the last hidden layer of the backbone with the
    local adapter alone, pooled over tokens), the local adapter's weight is
    ``alpha(x) = max_weight * mean_{j in S(x)} cos(e(x), e(x_j))`` over ``S(x)``, ``num_reference``
    of the client's training instances drawn at random for each test instance; the global adapter's
    weight is ``1 - alpha(x)``. Every adapted layer then mixes its experts with these per-row weights
    (the ``instance`` mixer).

    Attributes:
        global_slot, local_slot: expert slots of the global and the local adapter.
        max_weight, num_reference, pooling: see :class:`~fedtreelora.strategies.options.FedDPAOptions`.
    """

    global_slot: int = 0
    local_slot: int = 1
    max_weight: float = 0.5
    num_reference: int | None = 5
    pooling: str = "mean"

    def __call__(
        self,
        bank: AdapterBank,
        tokenizer: PreTrainedTokenizerBase,
        *,
        train_data: EncodedExamples | EncodedInstructions,
        val_data: EncodedExamples | EncodedInstructions,
        settings: LocalTraining,
        device: torch.device,
        seed: int,
    ) -> dict[str, Any]:
        """The scores of the client in slot 0 under instance-wise weights (accuracy, or ROUGE for
        instruction data), plus ``local_weight_mean`` (the mean alpha over its validation instances).
        Representations and scores run in batches of ``settings.eval_batch_size``."""
        alpha = self.alphas(bank, tokenizer, train_data, val_data, settings.eval_batch_size, device, seed)
        weights = torch.zeros(len(val_data), len(bank.expert_names))  # (n_val, experts)
        weights[:, self.global_slot] = 1.0 - alpha
        weights[:, self.local_slot] = alpha
        layers = list(bank.layers.values())

        def set_weights(indices: np.ndarray) -> None:
            for layer in layers:
                layer.set_instance_weights(weights[None, torch.as_tensor(indices)])

        with _restoring(layers):
            for layer in layers:
                layer.set_mixer("instance")
            if settings.generation is not None and settings.generation.do_sample:
                torch.manual_seed(seed)
            evaluation = evaluate_client(bank.model, tokenizer, val_data, settings, device, before_batch=set_weights)
        mean_alpha = float(alpha.mean()) if len(alpha) else float("nan")
        return {**evaluation, "local_weight_mean": mean_alpha}

    def alphas(
        self,
        bank: AdapterBank,
        tokenizer: PreTrainedTokenizerBase,
        train_data: EncodedExamples | EncodedInstructions,
        val_data: EncodedExamples | EncodedInstructions,
        batch_size: int,
        device: torch.device,
        seed: int,
    ) -> torch.Tensor:
        """(n_val,) the local adapter's weight for every validation instance of the client in slot 0,
        from representations computed with its local adapter alone."""
        layers = list(bank.layers.values())
        only_local = torch.zeros(len(bank.expert_names))
        only_local[self.local_slot] = 1.0
        with _restoring(layers):
            for layer in layers:
                layer.set_mixer("fixed")
                layer.get_buffer("fixed_weights").copy_(only_local)
            reference = self.representations(bank.model, tokenizer, train_data, batch_size, device)
            test = self.representations(bank.model, tokenizer, val_data, batch_size, device)
        return self.local_weights(test, reference, np.random.default_rng(seed))

    @torch.no_grad()
    def representations(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        data: EncodedExamples | EncodedInstructions,
        batch_size: int,
        device: torch.device,
    ) -> torch.Tensor:
        """(n, hidden) pooled last hidden layer of every instance of ``data`` (of its prompt, for
        instruction data), on CPU, float32."""
        model.eval()
        out = []
        batches = (
            iterate_prompts(tokenizer, data, batch_size)
            if isinstance(data, EncodedInstructions)
            else eval_batches(tokenizer, data, batch_size)
        )
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            hidden = model(**batch, output_hidden_states=True).hidden_states[-1].float()  # (b, T, hidden)
            if self.pooling == "cls":
                out.append(hidden[:, 0])
            elif self.pooling == "last":  # batches are right-padded: the last real token ends each row
                last = batch["attention_mask"].sum(dim=1) - 1  # (b,)
                out.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])
            else:
                mask = batch["attention_mask"][..., None].to(hidden.dtype)  # (b, T, 1)
                out.append((hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0))
        return torch.cat(out).cpu() if out else torch.zeros(0, 0)

    def local_weights(self, test: torch.Tensor, reference: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """alpha for every test instance.

        Args:
            test: (m, hidden) test representations.
            reference: (n, hidden) the client's training representations.
            rng: draws each test instance's reference subset.
        Returns:
            (m,) ``max_weight * mean cosine similarity`` to the drawn references (0 without references).
        """
        m, n = test.shape[0], reference.shape[0]
        if m == 0 or n == 0:
            return torch.zeros(m)
        cos = nn.functional.normalize(test, dim=-1) @ nn.functional.normalize(reference, dim=-1).T  # (m, n)
        if self.num_reference is None or self.num_reference >= n:
            mean = cos.mean(dim=1)
        else:
            picks = np.stack([rng.choice(n, size=self.num_reference, replace=False) for _ in range(m)])
            mean = torch.gather(cos, 1, torch.from_numpy(picks)).mean(dim=1)
        return self.max_weight * mean


@contextmanager
def _restoring(layers: Sequence[MultiClientLoraLinear]) -> Iterator[None]:
    """Put every layer's mixer, fixed weights and instance weights back as they were on exit."""
    saved = [(layer.mixer, layer.get_buffer("fixed_weights").clone()) for layer in layers]
    try:
        yield
    finally:
        for layer, (mixer, fixed) in zip(layers, saved, strict=True):
            layer.set_mixer(mixer)
            layer.get_buffer("fixed_weights").copy_(fixed)
            layer.set_instance_weights(None)
