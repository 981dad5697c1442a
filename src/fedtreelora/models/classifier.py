"""Sequence classifiers: an encoder with a fresh classification head (the NLU side)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)
from transformers import logging as hf_logging

from fedtreelora.errors import ConfigError
from fedtreelora.models.installed import resolve_model_path


@dataclass
class Backbone:
    """A loaded model and what the engine needs to know about it.

    Attributes:
        model: a transformers ``*ForSequenceClassification`` or ``*ForCausalLM`` model.
        tokenizer: its tokenizer (with a pad token).
        head_modules: names of the newly initialised modules (a classification head; none for a causal LM).
        task: ``classification`` or ``generation``.
    """

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    head_modules: list[str] = field(default_factory=list)
    task: str = "classification"


def cut_layers(config: PretrainedConfig, num_layers: int | None, name: str) -> None:
    """Keep only the first ``num_layers`` transformer layers (their pretrained weights load as usual)."""
    if num_layers is None:
        return
    available = getattr(config, "num_hidden_layers", None)
    if available is not None and num_layers > available:
        raise ConfigError(f"model.num_layers is {num_layers} but {name!r} has only {available} layers")
    config.num_hidden_layers = num_layers
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) > num_layers:  # Qwen-style per-layer attention kinds
        config.layer_types = layer_types[:num_layers]


def _head_modules(model: nn.Module, missing_keys: list[str]) -> list[str]:
    """Smallest modules covering every newly initialised parameter (e.g. ``classifier``)."""
    names = set(dict(model.named_modules()))
    heads: list[str] = []
    for key in sorted(missing_keys):
        parts = key.split(".")[:-1]
        module = next((".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in names), None)
        if module is not None and module not in heads:
            heads.append(module)
    return heads


def load_classifier(name: str, num_labels: int, *, num_layers: int | None = None, seed: int = 0) -> Backbone:
    """Load a backbone with a fresh classification head of ``num_labels`` outputs.

    The head's random initialisation comes from ``seed``, so every client (and every method run
    with the same seed) starts from the same head.

    Args:
        name: ``minilm``, a hub id (``roberta-large``) or a local folder.
        num_labels: classes.
        num_layers: keep only the first n transformer layers (their pretrained weights); None keeps all.
        seed: seed of the head initialisation.
    """
    path = resolve_model_path(name)
    config = AutoConfig.from_pretrained(path, num_labels=num_labels)
    cut_layers(config, num_layers, name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        # Decoder-only models ship without a pad token; padding is masked out, so EOS serves.
        tokenizer.pad_token = tokenizer.eos_token
    config.pad_token_id = tokenizer.pad_token_id
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # the "newly initialized head" report is expected here
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, config=config, output_loading_info=True
            )
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    heads = _head_modules(model, list(info.get("missing_keys", [])))
    return Backbone(model=model, tokenizer=tokenizer, head_modules=heads, task="classification")


def is_local_path(name: str) -> bool:
    return Path(name).exists()
