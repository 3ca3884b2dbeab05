"""The training protocol where it must match the reference trainer (issue "Same protocol as the reference").

Protects: the composed defaults (DFlash/DSpark position decay 4.0, Qwen3 recipes regenerate with
Qwen3's sampling and 4,096 new tokens, AdamW betas and the Eagle3 loss normalisation as settings
with the reference's values); a regenerated turn cut at the length limit is `truncated` in the row
accounting and its end-of-turn token is not supervised; an fp8 feature cache keeps the final hidden
state at 16 bits (shards, manifest, bytes/token, `data estimate`) and still reads the older layout;
Eagle3's draft vocabulary is counted over every supervised token of the training set from token
ids, without a target forward; the per-sequence Eagle3 loss weighs every sequence the same.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from data_tools.cache import FeatureCache, bytes_per_token
from data_tools.features import CacheSource, open_feature_splits, write_feature_cache
from data_tools.hf_engine import HFEngine
from data_tools.jsonl import iter_jsonl, write_jsonl_atomic
from data_tools.regenerate import OUTPUT_FILE, SamplingSettings, run_regeneration
from data_tools.tokenize import load_sequences, tokenize_chat
from deepspec.config import compose, section
from deepspec.losses import eagle_soft_ce
from deepspec.training.loop import loss_weights
from tests.tiny import chat_target as load_chat_target

LAYERS = [0, 2]


@pytest.fixture(scope="module")
def target():
    return load_chat_target()


# ---- composed defaults -----------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["dspark_smollm2", "dflash_smollm2", "dspark_qwen3_4b", "dflash_qwen3_4b"])
def test_position_decay_defaults_to_the_reference_constant(recipe):
    cfg = compose([f"recipe={recipe}"])
    assert cfg.loss.gamma_w == 4.0
    w = loss_weights(section(cfg, "drafter"), cfg.loss.gamma_w)
    assert w.shape == (7,) and w[-1].item() == pytest.approx(math.exp(-6 / 4), rel=1e-6)  # 0.22, not 0.42
    paper = loss_weights(section(compose([f"recipe={recipe}", "loss.gamma_w=null"]), "drafter"), None)
    assert paper[-1].item() == pytest.approx(math.exp(-6 / 7), rel=1e-6)


@pytest.mark.parametrize("recipe", ["dspark_qwen3_4b", "dflash_qwen3_4b", "eagle3_qwen3_4b"])
def test_qwen3_recipes_regenerate_like_the_reference(recipe):
    r = compose([f"recipe={recipe}"]).regen
    assert (r.temperature, r.top_p, r.top_k, r.max_new_tokens, r.thinking) == (0.7, 0.8, 20, 4096, False)


@pytest.mark.parametrize("recipe", ["dspark_qwen3_4b", "eagle3_qwen3_4b", "eagle3_smollm2"])
def test_betas_and_eagle3_normalisation_are_settings_with_the_reference_values(recipe):
    cfg = compose([f"recipe={recipe}"])
    if "qwen3" in recipe:
        assert list(cfg.trainer.betas) == [0.9, 0.999]
    assert cfg.loss.eagle3_normalise == "sequence"
    assert compose([f"recipe={recipe}", "loss.eagle3_normalise=token"]).loss.eagle3_normalise == "token"


# ---- regeneration: truncated turns ------------------------------------------------------------


def test_turn_cut_at_the_length_limit_is_truncated_and_its_end_token_unsupervised(tmp_path, target):
    row = {"id": "a", "source": "t", "messages": [{"role": "user", "content": "Count to fifty."}], "meta": {}}
    (tmp_path / "in.jsonl").write_text(json.dumps(row) + "\n")
    settings = SamplingSettings(max_new_tokens=3, max_seq_len=256)
    engine = HFEngine(target, settings, batch_size=1)
    summary = run_regeneration(tmp_path / "in.jsonl", tmp_path / "r", engine, settings, progress=False)
    (row,) = [r for _, r in iter_jsonl(tmp_path / "r" / OUTPUT_FILE)]
    assert row["meta"]["regen"]["finish_reasons"] == ["length"]  # random weights never emit <|im_end|>
    assert row["status"] == "truncated" and row["messages"][-1]["role"] == "assistant"
    assert (summary["truncated"], summary["success"], summary["input_rows"]) == (1, 0, 1)

    (seq,), dropped, _ = load_sequences(tmp_path / "r", target.tokenizer, 256)  # trained on, not dropped
    assert not dropped
    tok = target.tokenizer
    supervised = tok.decode([t for t, m in zip(seq.input_ids, seq.loss_mask, strict=True) if m])
    answer = row["messages"][-1]["content"]
    assert supervised == answer.strip() or supervised in answer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end in seq.input_ids[-2:]  # the template closes the cut turn ...
    assert not any(m for t, m in zip(seq.input_ids, seq.loss_mask, strict=True) if t == end)  # ... unlabelled


def test_only_the_cut_turn_loses_its_end_token(target):
    tok = target.tokenizer
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
            {"role": "user", "content": "More"}, {"role": "assistant", "content": "It was cut mid"}]
    whole = tokenize_chat(tok, msgs)
    cut = tokenize_chat(tok, msgs, cut_turns=[1])
    texts = [tok.decode(cut.input_ids[a:b]) for a, b in cut.spans]
    assert texts == ["Hello there<|im_end|>", "It was cut mid"]
    assert sum(whole.loss_mask) - sum(cut.loss_mask) == 1


def test_the_targets_own_token_ids_replace_a_retokenized_answer(target, tmp_path_factory):
    """A target may split a word non-canonically; training keeps the ids it generated (per turn, from
    meta.regen.answer_token_ids), later turns' spans shift with the splice, and ids that do not decode
    to the turn's text are ignored (the text's tokens stay)."""
    tok = target.tokenizer
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
            {"role": "user", "content": "More"}, {"role": "assistant", "content": "Janet sells eggs"}]
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    odd1 = enc("Hel") + enc("lo") + enc(" there")
    odd2 = enc("Ja") + enc("net") + enc(" sel") + enc("ls eggs")
    assert odd1 != enc("Hello there") and odd2 != enc("Janet sells eggs")
    plain = tokenize_chat(tok, msgs)
    own = tokenize_chat(tok, msgs, turn_ids=[odd1, odd2])
    texts = [tok.decode(own.input_ids[a:b]) for a, b in own.spans]
    assert texts == ["Hello there<|im_end|>", "Janet sells eggs<|im_end|>"]
    assert own.input_ids[own.spans[0][0]:own.spans[0][1] - 1] == odd1
    assert own.input_ids[own.spans[1][0]:own.spans[1][1] - 1] == odd2
    assert sum(own.loss_mask) == len(odd1) + len(odd2) + 2
    assert len(own.input_ids) - len(plain.input_ids) == (len(odd1) + len(odd2)) - (len(enc("Hello there"))
                                                                                 + len(enc("Janet sells eggs")))
    assert tok.decode(own.input_ids) == tok.decode(plain.input_ids)
    eot = tok.convert_tokens_to_ids("<|im_end|>")  # an engine reporting the stop token with the answer
    assert tokenize_chat(tok, msgs, turn_ids=[odd1 + [eot], odd2]).input_ids == own.input_ids
    # ids of another text, or a missing turn: the text's own tokens
    wrong = tokenize_chat(tok, msgs, turn_ids=[enc("Goodbye"), None])
    assert (wrong.input_ids, wrong.loss_mask) == (plain.input_ids, plain.loss_mask)
    # load_sequences reads them from the regenerated row's meta
    row = {"id": "r", "status": "success", "messages": msgs,
           "meta": {"regen": {"answer_token_ids": [odd1, odd2], "finish_reasons": ["stop", "stop"]}}}
    folder = tmp_path_factory.mktemp("ids")
    (folder / "regenerated.jsonl").write_text(json.dumps(row) + "\n")
    (seq,), dropped, _ = load_sequences(folder, tok, 512)
    assert (seq.input_ids, seq.loss_mask) == (own.input_ids, own.loss_mask) and not dropped


def test_hf_regeneration_records_the_generated_ids(tmp_path, target):
    row = {"id": "a", "source": "t", "messages": [{"role": "user", "content": "Count to fifty."}], "meta": {}}
    (tmp_path / "in.jsonl").write_text(json.dumps(row) + "\n")
    settings = SamplingSettings(max_new_tokens=6, max_seq_len=256)
    run_regeneration(tmp_path / "in.jsonl", tmp_path / "r", HFEngine(target, settings, batch_size=1), settings,
                     progress=False)
    (out,) = [r for _, r in iter_jsonl(tmp_path / "r" / OUTPUT_FILE)]
    (ids,) = out["meta"]["regen"]["answer_token_ids"]
    assert len(ids) == 6 and target.tokenizer.decode(ids, skip_special_tokens=True) == out["messages"][-1]["content"]
    (seq,), _, _ = load_sequences(tmp_path / "r", target.tokenizer, 256)
    supervised = [t for t, m in zip(seq.input_ids, seq.loss_mask, strict=True) if m]
    assert supervised == ids  # the random model's ids, not a re-tokenization of its text


# ---- fp8 cache: the final hidden state at 16 bits ---------------------------------------------


def conversations(n: int) -> list[dict]:
    return [{"index": i, "id": f"r{i}", "split": "heldout" if i == n - 1 else "train", "status": "success",
             "messages": [{"role": "user", "content": f"What is {i} times {i}?"},
                          {"role": "assistant", "content": f"{i} times {i} is {i * i}. " * (1 + i % 2)}],
             "meta": {"regen": {"thinking": False}}} for i in range(n)]


@pytest.fixture(scope="module")
def caches(target, tmp_path_factory):
    root = tmp_path_factory.mktemp("protocol")
    write_jsonl_atomic(root / "reg" / "regenerated.jsonl", conversations(6))
    out = {}
    for dtype in ("fp32", "fp8"):
        out[dtype] = write_feature_cache(root / "reg", target, LAYERS, root / dtype, storage_dtype=dtype,
                                         max_seq_len=64, shard_tokens=100, progress=False)
    return root, out


def test_fp8_cache_keeps_the_final_hidden_state_at_16_bits(caches):
    root, summaries = caches
    s = summaries["fp8"]
    assert s["final_dtype"] == "bf16"
    manifest = json.loads((root / "fp8" / "manifest.json").read_text())
    assert manifest["identity"]["storage_dtype"] == "fp8" and manifest["identity"]["final_dtype"] == "bf16"
    D = 64
    assert manifest["bytes_per_token"] == 4 + 1 + len(LAYERS) * D + 2 * D + len(LAYERS) * 4
    with safe_open(str(root / "fp8" / manifest["shards"][0]["file"]), framework="pt") as f:
        assert f.get_slice("final").get_dtype() == "BF16" and f.get_slice("taps").get_dtype() == "F8_E4M3"
        assert "final_scale" not in set(f.keys())
    fp8, fp32 = FeatureCache(root / "fp8"), FeatureCache(root / "fp32")
    assert fp8.final_dtype == "bf16"
    for i in range(len(fp32)):  # final within bf16 rounding, not fp8's
        a, b = fp8[i].final_TD, fp32[i].final_TD
        assert ((a - b).abs() <= b.abs() * 2 ** -8 + 1e-6).all()


def test_old_fp8_cache_with_an_fp8_final_still_reads(caches, tmp_path):
    from data_tools.cache import EncodedSequence, encode, write_manifest, write_shard

    root, _ = caches
    ref = FeatureCache(root / "fp32")
    seqs = [ref[i] for i in range(len(ref))]
    encoded = []
    for f in seqs:  # the layout before the rule: the final hidden state in fp8 with a per-row scale
        taps, taps_scale = encode(f.taps_TMD, "fp8")
        final, final_scale = encode(f.final_TD, "fp8")
        encoded.append(EncodedSequence(f.input_ids_T, f.loss_mask_T, taps, final, taps_scale, final_scale))
    entry = write_shard(tmp_path / "old" / "shards" / "shard-00000.safetensors", list(range(len(seqs))),
                        ["train"] * len(seqs), encoded, "fp8")
    with safe_open(str(tmp_path / "old" / entry["file"]), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["final_scale"] = torch.cat([e.final_scale_T for e in encoded])
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "old" / entry["file"]))
    from data_tools.cache import file_sha256

    entry.update(sha256=file_sha256(tmp_path / "old" / entry["file"]))
    identity = {k: v for k, v in ref.identity.items() if k != "final_dtype"} | {"storage_dtype": "fp8"}
    write_manifest(tmp_path / "old", identity, {}, [entry], complete=True)
    old = FeatureCache(tmp_path / "old", verify="open")
    assert old.final_dtype == "fp8"
    got, want = old[1].final_TD, seqs[1].final_TD
    assert ((got - want).abs() <= want.abs().amax(-1, keepdim=True) * 0.07).all()  # fp8 precision


def test_resuming_an_fp8_extraction_from_before_the_rule_is_refused_with_the_reason(caches, target, tmp_path):
    import shutil

    root, _ = caches
    shutil.copytree(root / "fp8", tmp_path / "old")
    for name in ("manifest.json", "features_state.json"):  # as the older code wrote them
        doc = json.loads((tmp_path / "old" / name).read_text())
        del doc["fingerprint"]["identity"]["final_dtype"]
        (tmp_path / "old" / name).write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="written before fp8 caches kept the final hidden state at bf16"):
        write_feature_cache(root / "reg", target, LAYERS, tmp_path / "old", storage_dtype="fp8",
                            max_seq_len=64, shard_tokens=100, progress=False)


def test_data_estimate_reflects_the_16_bit_final(capsys):
    from data_tools.commands import estimate

    est = estimate(compose(["recipe=dspark_smollm2", "features.dtype=fp8", "data.tokens=1000"]))
    m, d = 5, 576
    assert est["final_dtype"] == "bf16"
    assert est["bytes_per_token"] == 4 + 1 + m * d + 2 * d + m * 4 == bytes_per_token(m, d, "fp8")
    assert est["all_dtypes"]["bf16"] == 5 + 2 * d * (m + 1)
    assert "fp8 keeps the final" in capsys.readouterr().out


# ---- Eagle3 draft vocabulary --------------------------------------------------------------------


def test_supervised_tokens_come_from_the_cache_columns(caches, target):
    root, _ = caches
    cache = FeatureCache(root / "fp32")
    ids = cache.supervised_tokens(cache.sequence_ids())
    for i, got in enumerate(ids):
        seq = cache[i]
        assert torch.equal(got, seq.input_ids_T[seq.loss_mask_T])
    (train,) = open_feature_splits(root / "reg", target, LAYERS, "online", ("train",), max_seq_len=64)
    from_conversations = train.supervised_tokens(list(range(len(train))))
    source = CacheSource(cache)
    assert all(torch.equal(a, b) for a, b in zip(from_conversations, source.supervised_tokens(
        list(range(len(train)))), strict=True))


class CountingSource:
    """Sequences whose supervised tokens are given; get_batch (a target forward) must not be called."""

    def __init__(self, tokens: list[torch.Tensor]):
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def get_batch(self, indices):
        raise AssertionError("the vocabulary count ran the target")

    def supervised_tokens(self, indices):
        return [self.tokens[i] for i in indices]


def test_eagle3_vocabulary_is_counted_over_every_training_sequence(tiny_target):
    from deepspec.drafters import DrafterSpec, build_drafter
    from deepspec.training.train import set_eagle3_vocab

    target = tiny_target("llama")
    V = target.vocab_size
    drafter = build_drafter(DrafterSpec(kind="eagle3", num_layers=1, layer_ids=[1, 2, 3], draft_vocab_size=4),
                            target.shapes)
    # tokens 1-3 fill the first 64 sequences; token 200 appears only later, but more often than 2 and 3
    early = [torch.tensor([1, 1, 1, 2, 3])] * 64
    late = [torch.tensor([200] * 10)] * 40
    info = set_eagle3_vocab(drafter, CountingSource(early + late), V, 4,
                            heldout=CountingSource([torch.tensor([200, 1])]))
    kept = set(drafter.draft_to_target().tolist())
    assert 200 in kept and {1, 2, 3} <= kept
    assert info["tokens"] == 64 * 5 + 40 * 10 and info["heldout_coverage"] == 1.0


# ---- Eagle3 loss normalisation ----------------------------------------------------------------------


def test_per_sequence_normalisation_weighs_every_sequence_the_same():
    from deepspec.losses import eagle3_row_weights

    T, K = 4, 2
    valid = torch.zeros(2 * T, K, dtype=torch.bool)
    valid[:4] = True  # sequence 0: 4 supervised rows per step
    valid[4] = True  # sequence 1: 1 supervised row per step
    w_K = torch.tensor([1.0, 0.5])
    token = eagle3_row_weights(valid, w_K, T, per_sequence=False)
    seq = eagle3_row_weights(valid, w_K, T, per_sequence=True)
    torch.testing.assert_close(token.sum(0), torch.tensor([5.0, 2.5]))
    torch.testing.assert_close(seq[:4].sum(0), w_K)
    torch.testing.assert_close(seq[4:].sum(0), w_K)  # one row weighs as much as sequence 0's four

    # the loss with these weights / their sum is the mean over sequences of each sequence's mean
    g = torch.Generator().manual_seed(0)
    D, V = 8, 16
    h = torch.randn(2 * T, K, D, generator=g, requires_grad=True)
    th = torch.randn(2 * T, K, D, generator=g)
    W = torch.randn(V, D, generator=g)
    loss, wsum, _, _ = eagle_soft_ce(h, W, th, W, valid, seq, None, chunk_size=5)
    per_row = [eagle_soft_ce(h[n:n + 1], W, th[n:n + 1], W, valid[n:n + 1], w_K, None)[0]
               for n in range(2 * T)]
    mean0 = sum(per_row[:4]) / 4
    torch.testing.assert_close(loss / wsum, ((mean0 + per_row[4]) / 2) / w_K.sum())
