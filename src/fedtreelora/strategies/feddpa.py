"""FedDPA: a global adapter trained by FedAvg plus a local adapter, mixed per test instance."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedtreelora.adapters import AdapterBank, ExpertSpec, MultiClientLoraLinear, PhaseSpec
from fedtreelora.strategies.fedit import FedIT
from fedtreelora.strategies.options import FedDPAOptions  # noqa: F401  (re-exported)
from fedtreelora.strategies.registry import register
from fedtreelora.train.batches import EncodedExamples, eval_batches
from fedtreelora.train.client import LocalTraining
from fedtreelora.train.generation import EncodedInstructions, iterate_prompts
from fedtreelora.train.metrics import evaluate_client


@dataclass(frozen=True)
class InstanceWeighting:
    """FedDPA's instance-wise dynamic weighting, as a :attr:`PhaseSpec.evaluate` hook.

    For a test instance x with representation e(x) (the last hidden layer of the backbone with the
    local adapter alone, pooled over tokens), the local adapter's weight is
    ``alpha(x) = max_weight * mean_{j in S(x)} cos(e(x), e(x_j))`` over ``S(x)``, ``num_reference``
    of the client's training instances drawn at random for each test instance; the global adapter's
    weight is ``1 - alpha(x)``. Every adapted layer then mixes its experts with these per-row weights
    (the ``instance`` mixer).

    Attributes:
        global_slot, local_slot: expert slots of the global and the local adapter.
        max_weight, num_reference, pooling: see :class:`FedDPAOptions`.
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
        batch_size: int,
        device: torch.device,
        seed: int,
        settings: LocalTraining | None = None,
    ) -> dict[str, Any]:
        """The scores of the client in slot 0 under instance-wise weights (accuracy, or ROUGE for
        instruction data), plus ``local_weight_mean`` (the mean alpha over its validation instances)."""
        settings = settings or LocalTraining(eval_batch_size=batch_size)
        alpha = self.alphas(bank, tokenizer, train_data, val_data, batch_size, device, seed)
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
                layer.fixed_weights.copy_(only_local)
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
    saved = [(layer.mixer, layer.fixed_weights.clone()) for layer in layers]
    try:
        yield
    finally:
        for layer, (mixer, fixed) in zip(layers, saved, strict=True):
            layer.set_mixer(mixer)
            layer.fixed_weights.copy_(fixed)
            layer.set_instance_weights(None)


@register
class FedDPA(FedIT):
    """FedDPA (Yang, Long, Shen, Jiang, Blumenstein, "Dual-Personalizing Adapter for Federated
    Foundation Models", NeurIPS 2024).

    Each client holds a global adapter (one LoRA, averaged over all clients by FedAvg, A and B
    separately) and a local adapter (one LoRA it keeps). Training mixes them with fixed weights
    ``(1 - local_weight) * global + local_weight * local`` (0.5 / 0.5 as in the authors' code).
    At evaluation FedDPA's instance-wise dynamic weighting sets, for each test instance x, the local
    adapter's weight ``alpha(x) = max_weight * mean_j cos(e(x), e(x_j))`` over ``num_reference``
    (5) of the client's training instances x_j drawn at random for that instance, and the global
    adapter's weight ``1 - alpha(x)`` (see :class:`InstanceWeighting`); ``inference="fixed"`` keeps
    the training weights instead.

    Shared: the global adapter (trained, averaged over all clients). Local: the local adapter
    (trained, never sent). Frozen: backbone and head.
    On the wire each round: up, the client's global adapter (one LoRA); down, the averaged global
    adapter (one LoRA, from round 1 on).

    Implemented as in the paper and the authors' code, except (simplifications):

    - Both adapters train together in every local step (their gradients come from the same mixed
      forward). The paper's FedDPA-T alternates (the global adapter, then the local adapter with the
      global one frozen); FedDPA-F fine-tunes the local adapter after federated training.
    - e(x) is the backbone's last hidden layer with the local adapter alone (the authors' code also
      embeds with the local adapter), mean-pooled over non-padding tokens (their ``avg`` option; their
      default, the last token, suits a decoder: ``pooling="last"``); ``pooling="cls"`` takes [CLS]. For
      instruction data the instance is the prompt.
      Reference draws come from the client's round seed. As in the authors' code alpha can be
      negative for a dissimilar instance (the global weight then exceeds 1).
    - The instance-wise weighting runs in the client's evaluation (``PhaseSpec.evaluate``); a run
      with ``train.clients_per_pass > 1`` must evaluate through that hook too.
    """

    name = "feddpa"  # paper, table rank, options: its entry in strategies/registry.py (read without torch)
    expert_names = ("global", "local")
    trunk_expert = None  # not exported as a trunk (yet); FedIT's "shared" expert does not exist here

    def phase(self, rnd: int) -> PhaseSpec:
        opts = self.options
        evaluate = None
        if opts.inference == "instance":
            evaluate = InstanceWeighting(
                global_slot=0,
                local_slot=1,
                max_weight=opts.max_weight,
                num_reference=opts.num_reference,
                pooling=opts.pooling,
            )
        return PhaseSpec(
            experts=(ExpertSpec("global"), ExpertSpec("local")),
            mixer="fixed",
            fixed_weights=(1.0 - opts.local_weight, opts.local_weight),
            name="warmup" if self.is_warmup(rnd) else "federated",
            evaluate=evaluate,
        )

    def upload_keys(self, rnd: int, client: int) -> Sequence[str]:
        return self.expert_keys("global")
