"""The test suite's one tiny-model factory: random `transformers` models built from real configs.

Nothing is downloaded. Families: llama, qwen3, deepseek_v4 (`SIZES`), each sized so a CPU test
runs in seconds; `CHAT` is a Llama with the SmolLM2 vocabulary, paired with the embedded SmolLM2
tokenizer for tests that need a real chat template and loss masks. Tests pass overrides for what
they vary (vocab_size, num_hidden_layers, ...).
"""

from __future__ import annotations

SIZES = {
    "llama": dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256),
    "qwen3": dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256),
    "deepseek_v4": dict(vocab_size=256, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=6,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=16, q_lora_rank=16,
                        n_routed_experts=4, num_experts_per_tok=2, o_lora_rank=16, o_groups=2,
                        index_n_heads=2, index_head_dim=8, index_topk=4, qk_rope_head_dim=8, sliding_window=8,
                        max_position_embeddings=256),
}
CHAT = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048)
SMOLLM2_TOKENIZER = "embedded:smollm2-135m-instruct"


def tiny_config(model_type: str, **overrides) -> dict:
    """The config fields of a tiny `model_type` model, with `overrides` applied."""
    return {**SIZES[model_type], **overrides}


def tiny_target(model_type: str = "llama", seed: int = 0, stream_collapse: str = "mean",
                tokenizer: str | None = None, name: str | None = None, **overrides):
    """A FrozenTarget over a tiny random model (with a tokenizer only when `tokenizer` is given)."""
    from deepspec.targets import load_target

    config = {**(CHAT if model_type == "chat" else tiny_config(model_type)), **overrides}
    return load_target(source=f"random:{'llama' if model_type == 'chat' else model_type}",
                       name=name or f"tiny-{model_type}", device="cpu", random_config=config, seed=seed,
                       stream_collapse=stream_collapse, tokenizer=tokenizer,
                       need_tokenizer=tokenizer is not None)


def chat_target():
    """A tiny Llama with the SmolLM2 vocabulary and the embedded SmolLM2 tokenizer (chat template)."""
    return tiny_target("chat", tokenizer=SMOLLM2_TOKENIZER, name="tiny")


# the same target in a subprocess script (run with PYTHONPATH at the repository root)
LOAD_CHAT_TARGET = "from tests.tiny import chat_target\ntarget = chat_target()\n"


def cli_overrides(model_type: str = "llama", name: str | None = None, **overrides) -> list[str]:
    """`deepspec ...` overrides selecting a tiny random target (SmolLM2 tokenizer for `chat`)."""
    config = {**(CHAT if model_type == "chat" else tiny_config(model_type)), **overrides}
    source = "llama" if model_type == "chat" else model_type
    out = [f"target.source=random:{source}", f"target.name={name or 'tiny-' + model_type}",
           "target.device=cpu"]
    if model_type == "chat":
        out.append(f"target.tokenizer={SMOLLM2_TOKENIZER}")
    return out + [f"+target.random_config.{k}={v}" for k, v in config.items()]
