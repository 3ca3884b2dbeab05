"""Shared fixtures: tiny random targets built from real `transformers` configs (nothing downloaded)."""

from __future__ import annotations

import os

import pytest

import data_tools  # noqa: F401  (registers feature sources and shipped assets, as the CLI does)

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = {
    "llama": dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256),
    "qwen3": dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256),
    "deepseek_v4": dict(vocab_size=256, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=6,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=16, q_lora_rank=16,
                        n_routed_experts=4, num_experts_per_tok=2, o_lora_rank=16, o_groups=2, index_n_heads=2,
                        index_head_dim=8, index_topk=4, qk_rope_head_dim=8, sliding_window=8,
                        max_position_embeddings=256),
}


def make_tiny_target(model_type: str, seed: int = 0, stream_collapse: str = "mean", **overrides):
    from deepspec.targets import load_target

    return load_target(source=f"random:{model_type}", name=f"tiny-{model_type}", device="cpu",
                       random_config={**TINY[model_type], **overrides}, seed=seed,
                       stream_collapse=stream_collapse, need_tokenizer=False)


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
