"""Backbones: short names of installed models, any hub id or local path through transformers.

Sequence classifiers (:func:`load_classifier`) for the NLU side, causal language models
(:func:`load_causal_lm`) for instruction tuning; both return a :class:`Backbone`.
"""

from fedtreelora.models.causal import QUANTIZATIONS, load_causal_lm
from fedtreelora.models.classifier import Backbone, is_local_path, load_classifier
from fedtreelora.models.installed import INSTALLED_MODELS, InstalledModel, cache_dir, resolve_model_path

__all__ = [
    "INSTALLED_MODELS",
    "QUANTIZATIONS",
    "Backbone",
    "InstalledModel",
    "cache_dir",
    "is_local_path",
    "load_causal_lm",
    "load_classifier",
    "resolve_model_path",
]
