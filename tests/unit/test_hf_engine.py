"""Tests for the `hf` regeneration engine's own decoding loop (data_tools/hf_engine.py).

Protects: greedy answers equal `transformers` `generate` on the same left-padded batch,
also when rows stop at different steps and are dropped from the batch (KV cache
compaction); a row's greedy answer does not depend on its batch mates; the grouped decode
attention equals SDPA; sampled answers are reproducible from the seed; `regen.dtype`
resolves as documented and a bad value is refused.
"""

from __future__ import annotations

import pytest
import torch

from data_tools.hf_engine import HFEngine, decode_attention, resolve_dtype
from data_tools.regenerate import SamplingSettings
from tests.tiny import chat_target as load_chat_target


@pytest.fixture(scope="module")
def target():
    return load_chat_target()


def prompts_of(engine: HFEngine) -> list[list[int]]:
    questions = ["What is 2+2?", "Name three colours and say which one you like best, and why.", "Hi",
                 "Write a long story about a cat who learns to fly over the mountains."]
    return [engine.prompt_ids([{"role": "user", "content": q}]) for q in questions]


@torch.no_grad()
def reference(engine: HFEngine, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """transformers' generate on the same left-padded batch, cut after each row's first EOS."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), engine.pad_id)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):], mask[b, width - len(p):] = torch.tensor(p), 1
    model = engine.target.model
    impl = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, temperature=None, top_p=None,
                         top_k=None, max_new_tokens=max_new, eos_token_id=engine.eos_ids,
                         pad_token_id=engine.pad_id)
    model.set_attn_implementation(impl)
    rows = []
    for row in out[:, width:].tolist():
        stop = next((k for k, t in enumerate(row) if t in engine.eos_ids), None)
        rows.append(row if stop is None else row[:stop + 1])
    return rows


def answers(engine: HFEngine, prompts: list[list[int]]) -> list[list[int]]:
    tokens, lengths, _ = engine.decode(prompts)
    return [row[:n] for row, n in zip(tokens.tolist(), lengths.tolist(), strict=True)]


def test_greedy_matches_generate_with_rows_stopping_early(target):
    engine = HFEngine(target, SamplingSettings(max_new_tokens=12, max_seq_len=512), batch_size=4,
                      dtype="float32")
    prompts = prompts_of(engine)
    free = reference(engine, prompts, 12)
    # make tokens the random model emits mid-answer stop words: rows then end at different steps
    firsts = {r[0] for r in free}
    engine.eos_ids = sorted({t for t in (free[1][4], free[2][5]) if t not in firsts})
    expected = reference(engine, prompts, 12)
    lengths = sorted(len(r) for r in expected)
    assert lengths[0] < 12 and lengths[0] < lengths[-1]  # the test exercises early removal
    assert answers(engine, prompts) == expected
    texts = engine.generate(prompts)
    for (text, n, finish, ids), ref in zip(texts, expected, strict=True):
        assert n == len(ref)
        assert finish == ("stop" if ref[-1] in engine.eos_ids else "length")
        kept = ref[:-1] if finish == "stop" else ref
        assert text == target.tokenizer.decode(kept, skip_special_tokens=True)
        assert ids == kept  # the ids training uses instead of re-tokenizing the text


def test_row_answer_does_not_depend_on_batch_mates(target):
    engine = HFEngine(target, SamplingSettings(max_new_tokens=10, max_seq_len=512), batch_size=4,
                      dtype="float32")
    prompts = prompts_of(engine)
    together = answers(engine, prompts)
    alone = [answers(engine, [p])[0] for p in prompts]
    assert together == alone
    assert answers(engine, prompts[::-1]) == together[::-1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_equals_sdpa(dtype):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = torch.Generator().manual_seed(0)
    B, H, Hkv, L, d = 3, 6, 2, 9, 8
    q = torch.randn(B, H, 1, d, generator=g).to(dtype)
    k, v = (torch.randn(B, Hkv, L, d, generator=g).to(dtype) for _ in range(2))
    mask = torch.ones(B, 1, 1, L, dtype=torch.bool)
    mask[0, ..., :4] = False  # left padding of row 0
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = H // Hkv, True
    ours, _ = decode_attention(module, q, k, v, mask, scaling=0.3)
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    assert ours.shape == ref.shape == (B, 1, H, d)
    atol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(ours.float(), ref.float(), atol=atol, rtol=0)


def test_sampling_reproducible_from_seed(target):
    settings = SamplingSettings(max_new_tokens=8, max_seq_len=512, temperature=1.0, top_p=0.9, seed=3)
    engine = HFEngine(target, settings, batch_size=4, dtype="float32")
    prompts = prompts_of(engine)
    first = answers(engine, prompts)
    assert answers(engine, prompts) == first
    other_seed = SamplingSettings(**{**settings.__dict__, "seed": 4})
    assert first != answers(HFEngine(target, other_seed, dtype="float32"), prompts)


def test_dtype_resolution(monkeypatch):
    import data_tools.hf_engine as hf

    cpu = torch.device("cpu")
    monkeypatch.setattr(hf, "cpu_bf16_supported", lambda: True)
    assert resolve_dtype("auto", cpu, torch.float32) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda"), torch.float32) == torch.bfloat16
    monkeypatch.setattr(hf, "cpu_bf16_supported", lambda: False)
    assert resolve_dtype("auto", cpu, torch.float32) == torch.float32
    assert resolve_dtype("float32", cpu, torch.bfloat16) == torch.float32
    with pytest.raises(ValueError, match="regen.dtype='fp8'"):
        resolve_dtype("fp8", cpu, torch.float32)


def test_an_engine_that_changes_the_target_takes_it_out_of_the_shared_cache():
    # quickstart runs regenerate, train and eval in one process on one cached target: the bf16 cast and
    # decode attention of regeneration must not leak into the later stages' target
    from omegaconf import OmegaConf

    from deepspec.targets import target_from_config

    cfg = OmegaConf.create({"target": {"source": "random:llama", "name": "tiny", "gguf_file": None, "tokenizer": None,
                                       "dtype": "float32", "device": "cpu", "device_map": None,
                                       "stream_collapse": "mean", "random_config": {"num_hidden_layers": 2},
                                       "seed": 0, "chat_template": None}})
    shared = target_from_config(cfg, need_tokenizer=False)
    assert target_from_config(cfg, need_tokenizer=False) is shared
    shared.tokenizer = load_chat_target().tokenizer
    HFEngine(shared, SamplingSettings(max_new_tokens=4), batch_size=2, dtype="bfloat16")
    fresh = target_from_config(cfg, need_tokenizer=False)
    assert fresh is not shared
    assert next(fresh.model.parameters()).dtype == torch.float32
    assert fresh.model.config._attn_implementation != shared.model.config._attn_implementation
