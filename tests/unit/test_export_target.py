"""Target export for engines: an HF directory with plain weights, no quantization_config, a tokenizer.

The embedded SmolLM2 GGUF path is exercised by the engine check (scripts/engine_check.sh); here a
tiny local Llama with a word-level tokenizer stands in (nothing downloaded).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from deepspec.export.target import check_target_dir, export_target


@pytest.fixture()
def tiny_hf_dir(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(61)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1,
                                         tie_word_embeddings=True))
    src = tmp_path / "src"
    model.save_pretrained(src)
    fast.save_pretrained(src)
    return src, model


def test_export_target_writes_what_an_engine_loads(tiny_hf_dir, tmp_path):
    src, model = tiny_hf_dir
    out = tmp_path / "out"
    summary = export_target(str(src), out)
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(summary["files"])
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    weights = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in weights  # tied: the engine re-ties it to the embedding
    for name, t in model.state_dict().items():
        if name != "lm_head.weight":
            assert torch.equal(weights[name], t), name
    from transformers import AutoModelForCausalLM, AutoTokenizer

    back = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 5, 9, 3]])
    assert torch.equal(back(ids).logits, model(ids).logits)
    assert AutoTokenizer.from_pretrained(out).chat_template


def test_check_target_dir_refuses_a_quantization_config(tiny_hf_dir, tmp_path):
    src, _ = tiny_hf_dir
    out = tmp_path / "out"
    export_target(str(src), out)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gguf"}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quantization_config"):
        check_target_dir(out)


def test_a_random_target_is_exported_at_its_configured_size(tmp_path):
    """format=hf-target of a random:<family> target builds it from target.random_config (it used the
    family's full-size defaults: a 284B DeepSeek-V4, killed for memory) with target.tokenizer."""
    from tests.tiny import tiny_config

    cfg = tiny_config("deepseek_v4", vocab_size=49152)
    summary = export_target("random:deepseek_v4", tmp_path / "t", random_config=cfg,
                            tokenizer_source="embedded:smollm2-135m-instruct")
    written = json.loads((tmp_path / "t" / "config.json").read_text())
    assert (written["hidden_size"], written["num_hidden_layers"]) == (cfg["hidden_size"], cfg["num_hidden_layers"])
    assert (tmp_path / "t" / "model.safetensors").stat().st_size < 64 * 2**20
    assert "tokenizer.json" in summary["files"] and not any(f.startswith(".") for f in summary["files"])
    with pytest.raises(ValueError, match="target.tokenizer"):
        export_target("random:deepseek_v4", tmp_path / "u", random_config=cfg)
