"""Tests for target features (data_tools.tokenize / cache / features).

Protects: the loss mask covers exactly the assistant content plus its end-of-turn token
(never a role header, nor the newline after the end token) on SmolLM2's template and on a
Qwen3-style template with and without a <think> block; the cache reads back the online
features (fp32 bit-exact, bf16/fp16/fp8 within their precision); a corrupted shard is
caught by its checksum (on open, or on first read); a cache built for another target,
layer set or tokenizer is refused with both sides named; a feature run killed with
SIGKILL resumes to the same shards; hybrid mode writes on first use and reads after;
the held-out split and its fallback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from data_tools.cache import (
    FeatureCache,
    bytes_per_token,
    decode,
    deepspec_bytes_per_token,
    encode,
)
from data_tools.features import (
    OnlineSource,
    open_feature_source,
    open_feature_splits,
    split_indices,
    write_feature_cache,
)
from data_tools.jsonl import write_jsonl_atomic
from data_tools.tokenize import load_sequences, tokenize_chat
from tests.tiny import LOAD_CHAT_TARGET as LOAD_TINY
from tests.tiny import chat_target as load_chat_target

REPO = Path(__file__).resolve().parents[2]
LAYERS = [0, 2]

QWEN3_LIKE = (
    "{%- for message in messages -%}"
    "{%- if message.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if message.reasoning_content is defined and message.reasoning_content -%}"
    "{{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' -}}"
    "{%- elif loop.last and enable_thinking is defined and not enable_thinking -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{{- message.content + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and not enable_thinking -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)


@pytest.fixture(scope="module")
def target():
    return load_chat_target()


def conv(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Question number {i}: what is {i} + {i}?"},
            {"role": "assistant", "content": f"It is {2 * i}. " * (1 + i % 3)},
            {"role": "user", "content": "Thanks!"},
            {"role": "assistant", "content": "You are welcome."}]


def write_regenerated(folder: Path, n: int, heldout: tuple[int, ...] = ()) -> Path:
    rows = [{"index": i, "id": f"r{i}", "split": "heldout" if i in heldout else "train", "status": "success",
             "messages": conv(i), "meta": {"regen": {"thinking": False}}} for i in range(n)]
    rows.append({"index": n, "id": "err", "split": "train", "status": "error", "messages": conv(0), "meta": {}})
    write_jsonl_atomic(folder / "regenerated.jsonl", rows)
    return folder


def masked_texts(tokenizer, chat) -> list[str]:
    return [tokenizer.decode(chat.input_ids[a:b]) for a, b in chat.spans]


def test_loss_mask_smollm2_template(target):
    tok = target.tokenizer
    chat = tokenize_chat(tok, [{"role": "system", "content": "Be kind."}] + conv(4))
    assert masked_texts(tok, chat) == ["It is 8. It is 8. <|im_end|>", "You are welcome.<|im_end|>"]
    assert sum(chat.loss_mask) == sum(b - a for a, b in chat.spans)  # nothing masked outside the spans
    for a, b in chat.spans:
        assert tok.decode(chat.input_ids[a - 4:a]) == "<|im_start|>assistant\n"  # header unsupervised
        assert not any(chat.loss_mask[a - 4:a])
        assert not chat.loss_mask[b] and tok.decode(chat.input_ids[b:b + 1]) == "\n"


def test_loss_mask_qwen3_style_template_with_thinking(target):
    tok = target.tokenizer
    saved = tok.chat_template
    tok.chat_template = QWEN3_LIKE
    try:
        msgs = conv(1)
        off = tokenize_chat(tok, msgs, enable_thinking=False)
        text = tok.decode(off.input_ids)
        assert "<think>\n\n</think>\n\nYou are welcome." in text  # the template's empty think block ...
        assert masked_texts(tok, off) == ["It is 2. It is 2. <|im_end|>", "You are welcome.<|im_end|>"]

        msgs[3] = {"role": "assistant", "content": "Fine.", "reasoning_content": "The user thanked me."}
        on = tokenize_chat(tok, msgs, enable_thinking=True)  # ... is prompt, a generated one is supervised
        assert masked_texts(tok, on)[1] == "<think>\nThe user thanked me.\n</think>\n\nFine.<|im_end|>"

        msgs[3] = {"role": "assistant", "content": "<think>\nHmm.\n</think>\n\nOK."}
        inline = tokenize_chat(tok, msgs, enable_thinking=True)
        assert masked_texts(tok, inline)[1] == "<think>\nHmm.\n</think>\n\nOK.<|im_end|>"
    finally:
        tok.chat_template = saved


@pytest.mark.parametrize("dtype,rtol", [("fp32", 0.0), ("bf16", 8e-3), ("fp16", 1e-3), ("fp8", 7e-2)])
def test_storage_round_trip(dtype, rtol):
    x = torch.randn(50, 3, 64) * torch.logspace(-3, 3, 50).view(50, 1, 1)  # rows of very different scale
    y = decode(*encode(x, dtype))
    err = ((y - x).abs() / x.abs().amax(-1, keepdim=True)).max().item()
    assert err <= rtol and (dtype != "fp32" or torch.equal(x, y))


def test_bytes_per_token_layout():
    assert bytes_per_token(5, 576, "bf16") == 5 + 2 * 576 * 6 == deepspec_bytes_per_token(5, 576) - 1
    assert bytes_per_token(5, 576, "fp8") == 5 + 576 * 5 + 2 * 576 + 5 * 4  # the final hidden state in bf16
    assert bytes_per_token(5, 576, "fp32") == 5 + 4 * 576 * 6


@pytest.fixture(scope="module")
def built(target, tmp_path_factory):
    """A regenerate folder and its fp32 cache (several shards)."""
    root = tmp_path_factory.mktemp("feat")
    reg = write_regenerated(root / "reg", 10, heldout=(7,))
    summary = write_feature_cache(reg, target, LAYERS, root / "fp32", storage_dtype="fp32", max_seq_len=64,
                                  shard_tokens=200, batch_tokens=4096, progress=False)
    return root, reg, summary


def test_cache_reads_back_online_features(target, built):
    root, reg, summary = built
    assert summary["sequences"] == 10 and summary["dropped"] == {"regen_error": 1} and summary["shards"] > 2
    assert summary["measured_bytes_per_token"] >= summary["bytes_per_token"]
    cache = FeatureCache(root / "fp32", verify="open")
    seqs, _, _ = load_sequences(reg, target.tokenizer, 64)
    online = OnlineSource(seqs, target, LAYERS, 64, batch_tokens=4096)
    for shard in cache.shards:  # same batches as the cache run: bit-identical in fp32
        ids = shard["seq_index"]
        for i, feats in zip(ids, online.get_batch(ids), strict=True):
            got = cache[i]
            assert torch.equal(got.input_ids_T, feats.input_ids_T) and torch.equal(got.loss_mask_T, feats.loss_mask_T)
            assert torch.equal(got.taps_TMD, feats.taps_TMD) and torch.equal(got.final_TD, feats.final_TD)
            assert got.taps_TMD.shape == (len(seqs[i].input_ids), 2, 64)
    for dtype, tol in (("bf16", 1e-2), ("fp8", 8e-2)):
        write_feature_cache(reg, target, LAYERS, root / dtype, storage_dtype=dtype, max_seq_len=64,
                            shard_tokens=10_000, progress=False)
        low = open_feature_source(root / dtype, target, LAYERS, mode="online", split="all")
        ref = cache.get_batch(list(range(10)))
        for a, b in zip(low.get_batch(list(range(10))), ref, strict=True):
            scale = b.taps_TMD.abs().amax(-1, keepdim=True)
            assert ((a.taps_TMD - b.taps_TMD).abs() / scale).max() < tol
            assert a.taps_TMD.dtype == torch.float32


def test_checksum_corruption_detected(built, tmp_path):
    root, _, _ = built
    bad = tmp_path / "bad"
    os.system(f"cp -r {root / 'fp32'} {bad}")
    manifest = json.loads((bad / "manifest.json").read_text())
    shard = bad / manifest["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted"):
        FeatureCache(bad, verify="open")
    lazy = FeatureCache(bad)  # lazy: the clean shard reads, the bad one fails on first read
    lazy[manifest["shards"][0]["seq_index"][0]]
    with pytest.raises(ValueError, match=f"{shard.name} is corrupted"):
        lazy[manifest["shards"][1]["seq_index"][0]]
    FeatureCache(bad, verify="none")


def test_identity_mismatch_errors(target, built):
    root, _, _ = built
    with pytest.raises(ValueError, match=r"built for target tiny .*layers \[0, 2\].*layers \[0, 1\]"):
        open_feature_source(root / "fp32", target, [0, 1], mode="cache")
    ident = target.identity()
    with pytest.raises(ValueError, match="tokenizer_hash"):
        FeatureCache(root / "fp32", expect={**ident, "tokenizer_hash": "0123456789abcdef", "layer_ids": LAYERS})
    with pytest.raises(ValueError, match="other-target"):
        FeatureCache(root / "fp32", expect={**ident, "name": "other-target", "layer_ids": LAYERS})
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        open_feature_source(root / "reg", target, LAYERS, mode="cache")


def test_splits_and_fallback(target, built):
    root, reg, _ = built
    held = open_feature_source(root / "fp32", target, LAYERS, mode="cache", split="heldout")
    train = open_feature_source(root / "fp32", target, LAYERS, mode="cache", split="train")
    assert (len(held), len(train)) == (1, 9)
    assert torch.equal(held.get_batch([0])[0].input_ids_T, FeatureCache(root / "fp32")[7].input_ids_T)
    assert split_indices(["train"] * 40, "heldout") == [38, 39]
    assert split_indices(["train"] * 40, "train") == list(range(38))


def test_hybrid_writes_first_pass_then_reads(target, built, tmp_path):
    root, reg, _ = built
    calls = []
    real = target.forward
    target.forward = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        src = open_feature_source(reg, target, LAYERS, mode="hybrid", split="all", max_seq_len=64,
                                  cache_dir=tmp_path / "hyb", storage_dtype="fp16", shard_tokens=150)
        first = src.get_batch([3, 1]) + src.get_batch(list(range(10)))
        n_first = len(calls)
        assert n_first > 0 and (tmp_path / "hyb" / "manifest.json").exists()
        again = open_feature_source(reg, target, LAYERS, mode="hybrid", split="all", max_seq_len=64,
                                    cache_dir=tmp_path / "hyb", storage_dtype="fp16")
        second = again.get_batch([3, 1]) + again.get_batch(list(range(10)))
        assert len(calls) == n_first  # second pass: no target forward
    finally:
        target.forward = real
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a.taps_TMD, b.taps_TMD) and torch.equal(a.final_TD, b.final_TD)
    assert json.loads((tmp_path / "hyb" / "manifest.json").read_text())["complete"] is True
    assert len(FeatureCache(tmp_path / "hyb", verify="open")) == 10


def test_hybrid_splits_share_one_cache(target, built, tmp_path):
    """Train and held-out views of one hybrid source write one set of shards (no shard written twice),
    and a reopened source reads both splits from it."""
    root, reg, _ = built
    kw = dict(mode="hybrid", max_seq_len=64, cache_dir=tmp_path / "hyb", storage_dtype="bf16")
    train, held = open_feature_splits(reg, target, LAYERS, splits=("train", "heldout"), **kw)
    first = held.get_batch([0]) + train.get_batch([0, 1])
    train.flush()  # what the trainer does at an epoch end / before a checkpoint
    manifest = json.loads((tmp_path / "hyb" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 1 and len(FeatureCache(tmp_path / "hyb", verify="open")) == 3
    train2, held2 = open_feature_splits(reg, target, LAYERS, splits=("train", "heldout"), **kw)
    target.forward, real = (lambda *a, **k: pytest.fail("cached sequences must not run the target")), target.forward
    try:
        second = held2.get_batch([0]) + train2.get_batch([0, 1])
    finally:
        target.forward = real
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a.taps_TMD, b.taps_TMD) and torch.equal(a.input_ids_T, b.input_ids_T)


SLOW_SCRIPT = textwrap.dedent("""
    import sys, time
    {load}
    import data_tools.features as features

    real_write = features.write_shard
    def paced_write(*args, **kwargs):  # the test's pacing: a kill lands between / inside shards
        time.sleep(0.3)
        return real_write(*args, **kwargs)
    features.write_shard = paced_write
    features.write_feature_cache(sys.argv[1], target, {layers}, sys.argv[2], storage_dtype="bf16",
                                 max_seq_len=64, shard_tokens=120, progress=False)
""")


@pytest.mark.slow  # a subprocess loads torch + the tokenizer: ~20 s idle, more on a busy machine
def test_features_sigkill_resume(target, built, tmp_path):
    _, reg, _ = built
    script = tmp_path / "run.py"
    script.write_text(SLOW_SCRIPT.format(load=LOAD_TINY, layers=LAYERS))
    proc = subprocess.Popen([sys.executable, str(script), str(reg), str(tmp_path / "killed")],
                            env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    state = tmp_path / "killed" / "features_state.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if state.exists() and len(json.loads(state.read_text())["shards"]) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    kwargs = dict(storage_dtype="bf16", max_seq_len=64, shard_tokens=120, progress=False)
    resumed = write_feature_cache(reg, target, LAYERS, tmp_path / "killed", **kwargs)
    write_feature_cache(reg, target, LAYERS, tmp_path / "clean", **kwargs)
    assert 2 <= resumed["resumed_shards"] < resumed["shards"]
    a = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    b = json.loads((tmp_path / "clean" / "manifest.json").read_text())
    keys = ("file", "seq_index", "num_tokens", "loss_tokens", "split", "bytes")
    assert [{k: s[k] for k in keys} for s in a["shards"]] == [{k: s[k] for k in keys} for s in b["shards"]]
    assert [i for s in a["shards"] for i in s["seq_index"]] == list(range(10))  # every sequence exactly once
    killed, ref = FeatureCache(tmp_path / "killed", verify="open"), FeatureCache(tmp_path / "clean")
    for i in range(10):  # values agree to bf16 precision (fp32 sums may differ by an ulp between runs)
        x, y = killed[i], ref[i]
        assert torch.equal(x.input_ids_T, y.input_ids_T) and torch.equal(x.loss_mask_T, y.loss_mask_T)
        assert torch.allclose(x.taps_TMD, y.taps_TMD, rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="other input or settings"):
        write_feature_cache(reg, target, LAYERS, tmp_path / "killed", **{**kwargs, "storage_dtype": "fp16"})
