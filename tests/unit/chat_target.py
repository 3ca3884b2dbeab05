"""A tiny random Llama with the embedded SmolLM2 tokenizer (real chat template and loss masks, nothing
downloaded), shared by the data-tool tests; LOAD_TINY is the same as source for subprocess scripts."""

from __future__ import annotations

TINY = {"vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 2048}
LOAD_TINY = ("from deepspec.targets import load_target\n"
             f"target = load_target(source='random:llama', name='tiny', random_config={TINY!r}, "
             "tokenizer='embedded:smollm2-135m-instruct', device='cpu')\n")


def load_chat_target():
    scope: dict = {}
    exec(LOAD_TINY, scope)
    return scope["target"]
