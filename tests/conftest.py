"""Shared fixtures: the installed MiniLM cut to 2 layers (real weights, fast)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def minilm_path() -> str:
    from fedtreelora.models import resolve_model_path

    return resolve_model_path("minilm")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Real-model tests on a shared CPU: one torch thread is much faster than oversubscribed ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
