"""A tiny random Llama with the embedded SmolLM2 tokenizer (real chat template and loss masks, nothing
downloaded), shared by the data-tool tests; LOAD_TINY loads the same target in a subprocess script."""

from __future__ import annotations

TINY = {"vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 2048}
# Source for subprocess scripts, which run with PYTHONPATH at the repository root.
LOAD_TINY = "from tests.unit.chat_target import load_chat_target\ntarget = load_chat_target()\n"


def load_chat_target():
    from deepspec.targets import load_target

    return load_target(source="random:llama", name="tiny", random_config=TINY,
                       tokenizer="embedded:smollm2-135m-instruct", device="cpu")
