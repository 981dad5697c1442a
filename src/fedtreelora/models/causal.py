"""Causal language models for instruction tuning: the installed SmolLM2, any hub id or local path
(LLaMA, Qwen, Mistral families), optionally loaded in 8 or 4 bits through bitsandbytes on a CUDA GPU."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers import logging as hf_logging

from fedtreelora.errors import ConfigError
from fedtreelora.models.classifier import Backbone, cut_layers
from fedtreelora.models.installed import resolve_model_path

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig

QUANTIZATIONS = ("none", "8bit", "4bit")
"""Values of ``model.quantization``."""


def quantization_config(quantization: str, device: torch.device) -> BitsAndBytesConfig | None:
    """A ``BitsAndBytesConfig`` for ``8bit``/``4bit`` (None for ``none``), after checking that it can run.

    Raises:
        ConfigError: unknown value, no CUDA device, or bitsandbytes not installed; the message says how
            to fix it.
    """
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"model.quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if quantization == "none":
        return None
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ConfigError(
            f"model.quantization={quantization} loads weights through bitsandbytes, which needs a CUDA GPU "
            f"(the run's device is {device}); set model.quantization=none to run in full precision"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"model.quantization={quantization} needs the package 'bitsandbytes', which is not installed; "
            "install it with `pip install bitsandbytes` (or set model.quantization=none)"
        )
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )


def load_causal_lm(
    name: str,
    *,
    num_layers: int | None = None,
    quantization: str = "none",
    device: torch.device | str = "cpu",
) -> Backbone:
    """Load a decoder-only language model and its tokenizer.

    Args:
        name: ``smollm2`` (the installed SmolLM2-135M-Instruct), a hub id (``meta-llama/Llama-2-7b-hf``)
            or a local folder.
        num_layers: keep only the first n transformer layers (their pretrained weights); None keeps all.
        quantization: ``none`` (float32 weights), ``8bit`` or ``4bit`` (bitsandbytes, CUDA only; the
            model is then placed on ``device`` while loading, since quantized weights cannot move).
        device: where a quantized model is loaded; a full-precision model stays on CPU for the caller
            to move.

    The tokenizer gets a pad token (its EOS when it has none: padded positions are masked out of the
    attention and the loss, so the choice does not matter).
    """
    device = torch.device(device)
    quant = quantization_config(quantization, device)
    path = resolve_model_path(name)
    config = AutoConfig.from_pretrained(path)
    cut_layers(config, num_layers, name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs: dict = {"config": config}
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": device}, dtype=torch.bfloat16)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "some weights were not used" is expected when layers are cut
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return Backbone(model=model, tokenizer=tokenizer, head_modules=[], task="generation")


def is_quantized(model: torch.nn.Module) -> bool:
    """True for a model loaded through bitsandbytes (it must not be moved with ``.to``)."""
    return bool(getattr(model, "is_quantized", False) or getattr(model, "is_loaded_in_8bit", False))
