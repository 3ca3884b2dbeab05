"""Tests for regenerate + extract in one pass (data_tools/regen_features.py) against the stand-in vLLM
server of test_vllm_features.py (which generates greedily and writes files as the connector does).

Protects: the cached sequence is the token ids the target saw (prompt ids from the chat template +
generated ids + the template's end-of-turn tail; the stop token replaced by the template's end-of-turn,
supervised; after a length cut the tail unsupervised), never re-tokenised text; the features equal the
resident target's on those ids (what `deepspec data features` computes; fp32, 1e-5) although the answer
rows come from the generation request and only the rest from the follow-up; the rows of
regenerated.jsonl are the format `deepspec data regenerate` writes; multi-turn rows are regenerated
turn by turn on the ids so far; a run interrupted midway, with a torn journal line and an orphan
shard, resumes to the same rows and cache with every row once; the cache passes `deepspec train`'s
identity checks and is refused for other layers; the CLI wiring; the passes accounting.
"""

from __future__ import annotations

import json

import pytest
import torch

from data_tools.cache import FeatureCache
from data_tools.features import extract_features, open_feature_splits
from data_tools.jsonl import iter_jsonl, write_jsonl_atomic
from data_tools.regen_features import JOURNAL_FILE, ChatIds, OnePass, run_one_pass
from data_tools.regenerate import SamplingSettings
from data_tools.tokenize import ChatSequence, load_sequences
from data_tools.vllm_features import VllmExtractor, vllm_layer_ids
from tests.tiny import chat_target, cli_overrides
from tests.unit.test_vllm_features import FakeVllm

LAYERS = [2, 0]


@pytest.fixture(scope="module")
def target():
    return chat_target()


def server(target, tmp_path, stop_after):
    return FakeVllm(target, vllm_layer_ids(LAYERS, target.num_layers), tmp_path / "hs", stop_after=stop_after)


def prompts(folder, n: int, multi: tuple[int, ...] = (), heldout: tuple[int, ...] = ()):
    rows = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"Question {i}: what is {i} + {i}?"},
                {"role": "assistant", "content": "an old answer"}]
        if i in multi:
            msgs += [{"role": "user", "content": "And twice that?"}]
        rows.append({"id": f"p{i}", "source": "t", "messages": msgs, "meta": {},
                     "split": "heldout" if i in heldout else "train"})
    rows.append({"id": "empty", "source": "t", "messages": [{"role": "assistant", "content": "x"}], "meta": {}})
    write_jsonl_atomic(folder / "prompts.jsonl", rows)
    return folder / "prompts.jsonl"


def run(target, fake, inp, out, settings=None, **kw):
    settings = settings or SamplingSettings(max_new_tokens=6, max_seq_len=256)
    one_pass = OnePass(VllmExtractor([fake.url], target, LAYERS), target.tokenizer, settings, "fp32")
    return run_one_pass(inp, out, one_pass, target, LAYERS, progress=False, **kw)


def rows_of(path):
    return [row for _, row in iter_jsonl(path)]


def test_sequence_is_the_ids_the_target_saw_and_features_equal(target, tmp_path):
    fake = server(target, tmp_path, stop_after=3)
    try:
        summary = run(target, fake, prompts(tmp_path, 3, multi=(1,), heldout=(2,)), tmp_path / "o", concurrency=2,
                      settings=SamplingSettings(max_new_tokens=6, max_seq_len=256, temperature=0.5, top_k=5))
    finally:
        fake.close()
    tok = target.tokenizer
    chat = ChatIds(tok, False)
    out = rows_of(tmp_path / "o" / "regenerated.jsonl")
    assert [r["status"] for r in out] == ["success", "success", "success", "skipped"]  # the same format as regenerate
    assert out[0]["meta"]["regen"]["finish_reasons"] == ["stop"] and out[1]["meta"]["regen"]["new_tokens"] == 8
    gen = fake.bodies[0]
    assert (gen["max_tokens"], gen["temperature"], gen["top_k"], gen["kv_transfer_params"]) == \
        (6, 0.5, 5, {"include_output_tokens": True})
    cache = FeatureCache(tmp_path / "o")
    assert cache.sequence_ids() == [0, 1, 2] and cache.splits[2] == "heldout" and summary["sequences"] == 3
    eot, tail = tok.convert_tokens_to_ids("<|im_end|>"), chat.tail([{"role": "user", "content": "q"}])
    assert tok.decode(tail) == "<|im_end|>\n"
    for i, row in enumerate(out[:3]):
        got = cache[i]
        ids, mask = got.input_ids_T.tolist(), got.loss_mask_T.tolist()
        user = row["messages"][:1]
        prompt = chat.next_prompt([], user)
        answer = [r for r in fake.seen if r[:len(prompt)] == prompt][0][len(prompt):]  # generated ids, stop token last
        assert answer[-1] == eot and len(answer) == 4
        assert ids[:len(prompt) + 3] == prompt + answer[:3] and not any(mask[:len(prompt)])
        assert mask[len(prompt):len(prompt) + 4] == [True] * 4  # the answer and the end-of-turn it chose
        if len(row["messages"]) == 2:
            assert ids[len(prompt) + 3:] == tail and mask[-1] is False
        else:  # turn 2 follows on the ids so far: prompt + answer + tail + the next user turn
            nxt = chat.next_prompt(row["messages"][:2], row["messages"][2:3])
            start = len(prompt) + 3 + len(tail)
            assert ids[start:start + len(nxt)] == nxt and sum(mask) == 8
        want = extract_features(target, LAYERS, [ChatSequence(str(i), "train", ids, mask)])[0]
        torch.testing.assert_close(got.taps_TMD, want.taps_TMD.float(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.final_TD, want.final_TD.float(), atol=1e-5, rtol=1e-5)
    assert not list((tmp_path / "hs").glob("*.safetensors*"))  # every file read and removed
    p = summary["passes"]
    assert p["sequence_tokens"] == summary["tokens"] and p["generate_tokens"] + p["follow_up_tokens"] > 0
    assert p["follow_up_tokens"] < summary["tokens"] / 2  # the prefix cache served most of each follow-up
    train, held = open_feature_splits(tmp_path / "o", target, LAYERS, mode="cache")  # `deepspec train input=CACHE`
    assert (len(train), len(held)) == (2, 1)
    with pytest.raises(ValueError, match="layers"):
        open_feature_splits(tmp_path / "o", target, [1], mode="cache")


def test_cut_answer_gets_the_tail_unsupervised(target, tmp_path):
    fake = server(target, tmp_path, stop_after=None)
    try:
        run(target, fake, prompts(tmp_path, 1), tmp_path / "o")
    finally:
        fake.close()
    row = rows_of(tmp_path / "o" / "regenerated.jsonl")[0]
    assert row["status"] == "truncated" and row["meta"]["regen"]["finish_reasons"] == ["length"]
    got = FeatureCache(tmp_path / "o")[0]
    tail = ChatIds(target.tokenizer, False).tail([{"role": "user", "content": "q"}])
    assert got.input_ids_T.tolist()[-2:] == tail and got.loss_mask_T.tolist()[-3:] == [True, False, False]
    assert int(got.loss_mask_T.sum()) == 6
    seqs, _, _ = load_sequences(tmp_path / "o", target.tokenizer, 256)  # other stages read regenerated.jsonl
    assert len(seqs) == 1
    # ... with the generated ids it records, so a later `deepspec data features` trains on the same tokens
    (answer,) = row["meta"]["regen"]["answer_token_ids"]
    assert len(answer) == 6 and got.input_ids_T.tolist()[-8:-2] == answer
    assert seqs[0].input_ids == got.input_ids_T.tolist()


def test_interrupted_run_resumes_without_loss_or_duplication(target, tmp_path):
    inp = prompts(tmp_path, 6, multi=(3,))
    fake = server(target, tmp_path, stop_after=2)
    try:
        clean = run(target, fake, inp, tmp_path / "clean", shard_tokens=1, concurrency=1)

        class Killed(OnePass):
            calls = 0

            def run_row(self, row):
                Killed.calls += 1
                if Killed.calls == 4:
                    raise KeyboardInterrupt  # the process dies with row 3 in flight
                return super().run_row(row)

        settings = SamplingSettings(max_new_tokens=6, max_seq_len=256)
        killed = Killed(VllmExtractor([fake.url], target, LAYERS), target.tokenizer, settings, "fp32")
        with pytest.raises(KeyboardInterrupt):
            run_one_pass(inp, tmp_path / "o", killed, target, LAYERS, shard_tokens=1, concurrency=1, progress=False)
        journal = tmp_path / "o" / JOURNAL_FILE
        chunks = rows_of(journal)
        committed = sum(len(c["rows"]) for c in chunks)
        assert len(chunks) >= 2 and committed < 7  # a shard per row, the row in flight lost
        with open(journal, "a") as f:
            f.write('{"shard": {"file": "shards/shard-0000')  # torn mid-line
        (tmp_path / "o" / "shards" / f"shard-{len(chunks):05d}.safetensors").write_bytes(b"half a shard")
        resumed = run(target, fake, inp, tmp_path / "o", shard_tokens=1, concurrency=1)
    finally:
        fake.close()
    assert resumed["resumed_rows"] == committed and resumed["success"] == clean["success"] == 6
    assert rows_of(tmp_path / "o" / "regenerated.jsonl") == rows_of(tmp_path / "clean" / "regenerated.jsonl")
    got, want = FeatureCache(tmp_path / "o", verify="open"), FeatureCache(tmp_path / "clean")
    assert got.sequence_ids() == want.sequence_ids() == list(range(6))
    assert got.manifest["sequences"] == 6 and got.manifest["tokens"] == want.manifest["tokens"]
    for i in range(6):
        assert torch.equal(got[i].input_ids_T, want[i].input_ids_T)
        torch.testing.assert_close(got[i].final_TD, want[i].final_TD, atol=1e-5, rtol=1e-5)


def test_finished_run_reruns_as_is_and_other_settings_are_refused(target, tmp_path):
    fake = server(target, tmp_path, stop_after=1)
    try:
        inp = prompts(tmp_path, 1)
        first = run(target, fake, inp, tmp_path / "o")
        requests = len(fake.bodies)
        again = run(target, fake, inp, tmp_path / "o")  # a finished run: nothing to redo, the same outputs
        assert again["resumed_rows"] == 2 and len(fake.bodies) == requests and again["tokens"] == first["tokens"]
        with pytest.raises(ValueError, match=r"other .*settings"):
            run(target, fake, inp, tmp_path / "o", settings=SamplingSettings(max_new_tokens=9, max_seq_len=256))
    finally:
        fake.close()


def test_cli_features_regenerate(target, tmp_path, capsys):
    from deepspec.cli import main

    fake = server(target, tmp_path, stop_after=2)
    out = tmp_path / "F"
    common = ["data", "features", "recipe=dspark_smollm2", f"input={prompts(tmp_path, 2)}", f"output_dir={out}",
              *cli_overrides("chat", name="tiny"), "drafter.layer_ids=[0,2]", "features.dtype=fp32",
              "regen.max_new_tokens=5", "features.regenerate=true"]
    try:
        assert main([*common, "features.source=online"]) != 0
        assert "runs through vLLM (features.source=vllm)" in capsys.readouterr().err
        assert main([*common, "features.source=vllm", f"features.vllm_urls=[{fake.url}]"]) == 0
    finally:
        fake.close()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["success"] == summary["sequences"] == 2 and summary["vllm"]["requests"] == 4
    assert fake.bodies[0]["max_tokens"] == 5
    (train,) = open_feature_splits(out, target, [0, 2], mode="cache", splits=("all",))
    assert len(train) == 2
