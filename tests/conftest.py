"""Shared fixtures: the `tiny_target` factory fixture over tests/tiny.py (nothing downloaded)."""

from __future__ import annotations

import os

import pytest

import data_tools  # noqa: F401  (registers feature sources and shipped assets, as the CLI does)

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.tiny import tiny_target as make_tiny_target  # noqa: E402


@pytest.fixture(scope="session")
def tiny_target():
    """Factory: tiny_target("llama" | "qwen3" | "deepseek_v4", **config_overrides) -> FrozenTarget."""
    cache = {}

    def get(model_type: str = "llama", **overrides):
        key = (model_type, tuple(sorted(overrides.items())))
        if key not in cache:
            cache[key] = make_tiny_target(model_type, **overrides)
        return cache[key]

    return get
