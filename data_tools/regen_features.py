"""Regenerate and extract in one pass through vLLM (`deepspec data features features.regenerate=true`).

`deepspec data regenerate` then `deepspec data features` runs every answer through the target twice:
once to generate it, once more to extract its hidden states. Here one vLLM server (deepspec's
hidden-state connector, `data_tools/vllm_features.py`) does both from the same forward passes:

1. each turn's prompt is rendered with the target's chat template and sent as token ids to
   ``/v1/completions`` with the `regen` sampling settings and ``kv_transfer_params:
   {"include_output_tokens": true}``: the connector's file then holds the hidden states of the prompt
   and of every generated token but the last (whose state was never computed: it was only sampled);
2. the training sequence is built from token ids, never re-tokenised text: prompt ids + generated ids
   + the template's end-of-turn tail (``<|im_end|>\\n`` for ChatML). When the answer stopped on a stop
   token, that token is replaced by the tail's first token (the template's end-of-turn, supervised:
   the target chose to stop there); when it hit the length limit the whole tail follows the answer,
   unsupervised (as `tokenize_chat` labels a cut turn);
3. one follow-up request (``max_tokens=1``) on the whole sequence supplies the rows the file lacks:
   vLLM's prefix cache holds the prompt's and the answer's blocks (the hidden states live in its KV
   cache), so it computes only the tokens after the last whole cached block (fewer than the block
   size, 32 on a CPU at least, plus the tail).

Multi-turn rows are regenerated turn by turn as `deepspec data regenerate` does, each turn's prompt
being the ids so far + the template's text between the last answer and the next generation prompt;
the last turn's file covers every earlier turn (served from the prefix cache). A template that
rewrites earlier turns (so that a conversation's rendering is not an extension of its prefix's) ends
that row as ``error``.

Outputs, in one ``output_dir``: ``regenerated.jsonl`` (what `deepspec data regenerate` writes, so every
other stage reads it) and the feature cache (``manifest.json``, ``shards/``) with the identity
`deepspec data features` records; a sequence's number is its input row's index. Resume: rows are
committed a shard at a time, by one journal line holding the shard's entry and its rows' output
(``regen_journal.jsonl``; ``regen_state.json`` holds the fingerprint), written after the shard file;
a killed run loses at most the uncommitted rows and a rerun redoes them into the same shard name.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from data_tools.cache import (
    MANIFEST,
    EncodedSequence,
    bytes_per_token,
    check_dtype,
    write_manifest,
    write_shard,
)
from data_tools.features import cache_identity
from data_tools.jsonl import iter_jsonl, write_jsonl_atomic
from data_tools.regenerate import (
    OUTPUT_FILE,
    InputRow,
    RowResult,
    SamplingSettings,
    _check_rows,
    _cut_torn_tail,
    _summary,
    in_flight,
    open_run_state,
    output_row,
    read_input_rows,
)
from data_tools.tokenize import _render

JOURNAL_FILE = "regen_journal.jsonl"
ENGINE = "vllm-one-pass"
BLOCK_SIZE = 32  # vLLM KV block size of a local server: the follow-up recomputes < 1 block (CPU minimum: 32)
_MARK = "\x00deepspec-answer\x00"  # stands for an answer when the template's tail is looked up


class TemplateMismatch(ValueError):
    """The chat template renders a conversation as something other than an extension of its prefix."""


class ChatIds:
    """Token ids of the chat template's pieces around an answer (see the module docstring)."""

    def __init__(self, tokenizer, thinking: bool):
        self.tokenizer, self.thinking = tokenizer, thinking

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _text(self, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
        return _render(self.tokenizer, messages, generation_prompt, self.thinking)

    def next_prompt(self, history: list[dict[str, Any]], segment: list[dict[str, Any]]) -> list[int]:
        """Ids to append to the conversation so far (``history``, whose ids end with the last turn's
        tail) to reach the generation prompt after ``segment`` (its system/user messages)."""
        full = self._text(history + segment, True)
        done = self._text(history, False) if history else ""
        if not full.startswith(done):
            raise TemplateMismatch("the chat template renders the earlier turns differently once a turn follows "
                                   "(it rewrites history); regenerate this row with `deepspec data regenerate`")
        return self._ids(full[len(done):])

    def tail(self, messages: list[dict[str, Any]]) -> list[int]:
        """Ids the template puts after an assistant answer to ``messages`` (its end-of-turn tail)."""
        prompt = self._text(messages, True)
        full = self._text(messages + [{"role": "assistant", "content": _MARK}], False)
        if not full.startswith(prompt) or _MARK not in full[len(prompt):]:
            raise TemplateMismatch("the chat template does not render an answer right after its generation prompt")
        tail = self._ids(full[full.index(_MARK, len(prompt)) + len(_MARK):])
        if not tail:
            raise TemplateMismatch("the chat template renders nothing after an answer (no end-of-turn token to "
                                   "train on); set target.chat_template to a chat template")
        return tail


@dataclass
class RowOutcome:
    """One row's regeneration result, its features (storage form) and what its requests computed."""

    result: RowResult
    encoded: EncodedSequence | None = None
    computed: dict[str, int] = field(default_factory=dict)  # target tokens run: generate / follow_up


class OnePass:
    """Regenerates rows and extracts their features through a `VllmExtractor`'s servers."""

    def __init__(self, extractor, tokenizer, settings: SamplingSettings, storage_dtype: str):
        self.extractor, self.settings, self.dtype = extractor, settings, check_dtype(storage_dtype)
        self.chat = ChatIds(tokenizer, settings.thinking)

    def _sampling(self, max_tokens: int) -> dict[str, Any]:
        s = self.settings
        body = {"max_tokens": max_tokens, "temperature": s.temperature, "top_p": s.top_p, "seed": s.seed,
                "return_token_ids": True}
        if s.top_k > 0:
            body["top_k"] = s.top_k
        return body

    def run_row(self, row: InputRow) -> RowOutcome:
        """All turns of one row, then the follow-up; any failure ends the row as ``error``."""
        try:
            return self._run_row(row)
        except (TemplateMismatch, RuntimeError, OSError, KeyError, IndexError, ValueError) as exc:
            return RowOutcome(RowResult(row.index, "error", reason=f"{type(exc).__name__}: {exc}"))

    def _run_row(self, row: InputRow) -> RowOutcome:
        s = self.settings
        segments = row.segments(s.max_turns)
        ids: list[int] = []
        mask: list[bool] = []
        history: list[dict[str, Any]] = []
        result = RowResult(row.index, "success")
        computed = {"generate": 0, "follow_up": 0}
        last_file = None
        for t, segment in enumerate(segments):
            prompt = ids + self.chat.next_prompt(history, segment)
            tail = self.chat.tail(history + segment)
            room = s.max_seq_len - len(prompt) - len(tail)
            if room < 1:
                if t == 0:
                    return RowOutcome(RowResult(row.index, "skipped", reason="prompt_too_long"))
                result.turns_dropped = len(segments) - t
                break
            body = {"prompt": prompt, **self._sampling(min(s.max_new_tokens, room))}
            reply, hidden, file_ids = self.extractor.complete(body, {"include_output_tokens": True})
            choice = reply["choices"][0]
            gen = [int(i) for i in choice["token_ids"]]
            usage = reply.get("usage") or {}
            computed["generate"] += computed_tokens(usage) + max(len(gen) - 1, 0)
            stopped = choice.get("finish_reason") != "length"
            answer = gen[:-1] if stopped and gen else gen  # the stop token becomes the template's end-of-turn
            mask += [False] * (len(prompt) - len(ids)) + [True] * len(answer) + [stopped] + [False] * (len(tail) - 1)
            ids = prompt + answer + tail
            history = history + segment + [{"role": "assistant", "content": choice.get("text") or ""}]
            result.finish_reasons.append("stop" if stopped else "length")
            result.token_ids.append(answer)  # regenerated.jsonl records them: a later tokenization keeps them
            result.new_tokens += len(gen)
            last_file = (hidden, file_ids)
        hidden, file_ids = last_file
        keep = _common_prefix(file_ids.tolist(), ids)
        reply, rest, rest_ids = self.extractor.complete({"prompt": ids, "max_tokens": 1, "temperature": 0.0})
        computed["follow_up"] += computed_tokens(reply.get("usage") or {})
        if rest_ids.tolist() != ids:
            raise RuntimeError(f"the follow-up returned hidden states for {rest_ids.numel()} tokens, not the "
                               f"{len(ids)} sent")
        hidden_TND = torch.cat([hidden[:keep], rest[keep:]])
        feats = self.extractor.features(hidden_TND, torch.tensor(ids), mask)
        result.messages = history
        return RowOutcome(result, EncodedSequence.from_features(feats, self.dtype), computed)


def computed_tokens(usage: dict[str, Any]) -> int:
    """Prompt tokens a request ran through the target (those not served by the prefix cache)."""
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    return int(usage.get("prompt_tokens") or 0) - cached


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


class ChunkJournal:
    """Committed chunks of rows: one line per chunk, ``{"shard": entry | null, "rows": [output rows]}``,
    appended and fsynced after its shard file is written. A row journalled twice (an error retried)
    counts as its last entry; a torn last line (a kill mid-write) is cut off."""

    def __init__(self, folder: Path, fingerprint: dict[str, Any]):
        self.dir = Path(folder)
        open_run_state(self.dir, fingerprint)
        self.path = self.dir / JOURNAL_FILE
        self.done: dict[int, dict[str, Any]] = {}
        self.shards: list[dict[str, Any]] = []
        if self.path.exists():
            _cut_torn_tail(self.path)
            for _, chunk in iter_jsonl(self.path):
                for row in chunk["rows"]:
                    self.done[int(row["index"])] = row
                if chunk["shard"] is not None:
                    self._check_shard(chunk["shard"])
                    self.shards.append(chunk["shard"])
        self._file = open(self.path, "a", encoding="utf-8")

    def _check_shard(self, entry: dict[str, Any]) -> None:
        path = self.dir / entry["file"]
        if not path.exists() or path.stat().st_size != entry["bytes"]:
            raise ValueError(f"{self.path} records shard {path} ({entry['bytes']} bytes), which is missing or "
                             f"changed; restore it, or delete {self.dir} to start afresh")

    def next_shard(self) -> Path:
        return self.dir / "shards" / f"shard-{len(self.shards):05d}.safetensors"

    def commit(self, shard: dict[str, Any] | None, rows: list[dict[str, Any]]) -> None:
        self._file.write(json.dumps({"shard": shard, "rows": rows}, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        for row in rows:
            self.done[int(row["index"])] = row
        if shard is not None:
            self.shards.append(shard)

    def close(self) -> None:
        self._file.close()


def run_one_pass(input_path: str | Path, output_dir: str | Path, one_pass: OnePass, target, layer_ids: list[int],
                 shard_tokens: int = 262144, concurrency: int = 8, max_rows: int | None = None,
                 retry_failed: bool = True, max_error_fraction: float = 0.1,
                 progress: bool = True) -> dict[str, Any]:
    """Regenerate every row of ``input_path`` and write its features, into ``output_dir``; returns the
    summary (the regeneration's, the cache's, and the target passes each request kind cost)."""
    from deepspec.runs import run_started

    t0 = time.perf_counter()
    out = Path(output_dir)
    settings, dtype = one_pass.settings, one_pass.dtype
    rows, digest = read_input_rows(input_path, max_rows)
    _check_rows(input_path, rows)
    identity = cache_identity(target, layer_ids, dtype, settings.max_seq_len)
    engine = {"engine": ENGINE, "name": target.name}
    fingerprint = {"input_sha256": digest, "engine": engine, "sampling": asdict(settings),
                   "features": identity, "shard_tokens": shard_tokens}
    if (out / MANIFEST).exists() and json.loads((out / MANIFEST).read_text())["fingerprint"] != fingerprint:
        raise ValueError(f"{out} holds a feature cache built from other input or settings; delete it or choose "
                         f"another output_dir")
    journal = ChunkJournal(out, fingerprint)
    run_started()
    regen_meta = {"engine": ENGINE, "model": target.name, **asdict(settings)}

    def settled(r: InputRow) -> bool:
        done = journal.done.get(r.index)
        return done is not None and not (retry_failed and done["status"] == "error")

    resumed = sum(1 for r in rows if settled(r))
    by_index = {r.index: r for r in rows}
    todo = [r for r in rows if not settled(r)]
    pending: list[RowOutcome] = []
    attempted = failed = 0
    first_error = None
    computed: Counter = Counter()
    seq_tokens = new_tokens = 0
    bar = tqdm(total=len(todo), desc="regenerate+features", unit=" rows", disable=not progress)
    try:
        skips = [RowOutcome(RowResult(r.index, "skipped", reason=r.skip_reason)) for r in todo if r.skip_reason]
        for outcome in itertools.chain(skips, _outcomes(one_pass, [r for r in todo if not r.skip_reason],
                                                        concurrency)):
            pending.append(outcome)
            bar.update(1)
            if outcome.result.status == "error":
                failed += 1
                first_error = first_error or f"row {by_index[outcome.result.index].id}: {outcome.result.reason}"
            attempted += outcome.result.status != "skipped"
            computed.update(outcome.computed)
            new_tokens += outcome.result.new_tokens
            if outcome.encoded is not None:
                seq_tokens += outcome.encoded.input_ids_T.numel()
            if sum(o.encoded.input_ids_T.numel() for o in pending if o.encoded is not None) >= shard_tokens:
                _commit(journal, pending, by_index, regen_meta, dtype)
                pending = []
        _commit(journal, pending, by_index, regen_meta, dtype)
    finally:
        bar.close()
        journal.close()
    if failed and (failed == attempted or failed > max_error_fraction * attempted):
        raise RuntimeError(f"{failed} of the {attempted} rows this run regenerated failed (allowed: fewer than all and "
                           f"at most regen.max_error_fraction={max_error_fraction}); first error: {first_error}. "
                           f"The rest are kept in {journal.path}: fix the cause and rerun the same command")
    final = [journal.done[r.index] for r in rows]
    write_jsonl_atomic(out / OUTPUT_FILE, final)
    dropped = Counter(f"regen_{r['status']}" for r in final if r["status"] not in ("success", "truncated"))
    manifest = write_manifest(out, identity, fingerprint, journal.shards, complete=True,
                              extra={"bytes_per_token": bytes_per_token(len(layer_ids), target.hidden_size, dtype),
                                     "dropped": dict(dropped), "engine": ENGINE})
    summary = _summary(rows, final, resumed, new_tokens, time.perf_counter() - t0,
                       {"engine": engine, "sampling": asdict(settings)}, out)
    summary.update(input=str(input_path), sequences=manifest["sequences"], tokens=manifest["tokens"],
                   loss_tokens=manifest["loss_tokens"], shards=len(journal.shards), storage_dtype=dtype,
                   final_dtype=identity["final_dtype"], layer_ids=list(layer_ids),
                   bytes_per_token=manifest["bytes_per_token"],
                   total_bytes=sum(e["bytes"] for e in journal.shards), cache=str(out),
                   passes=passes(computed, seq_tokens))
    return summary


def passes(computed: Counter, seq_tokens: int) -> dict[str, Any]:
    """Target tokens computed per request kind, and per token of the sequences this run wrote."""
    total = computed["generate"] + computed["follow_up"]
    return {"sequence_tokens": seq_tokens, "generate_tokens": computed["generate"],
            "follow_up_tokens": computed["follow_up"],
            "per_sequence_token": round(total / seq_tokens, 4) if seq_tokens else None,
            "follow_up_per_sequence_token": round(computed["follow_up"] / seq_tokens, 4) if seq_tokens else None}


def _outcomes(one_pass: OnePass, rows: list[InputRow], concurrency: int) -> Iterator[RowOutcome]:
    """``one_pass.run_row`` over ``rows``, ``concurrency`` rows in flight, in completion order."""
    return in_flight(one_pass.run_row, rows, concurrency, "one-pass")


def _commit(journal: ChunkJournal, outcomes: list[RowOutcome], by_index: dict[int, InputRow],
            regen_meta: dict[str, Any], dtype: str) -> None:
    """Write the outcomes' features as the next shard (when any has features), then journal their rows."""
    if not outcomes:
        return
    with_features = sorted((o for o in outcomes if o.encoded is not None), key=lambda o: o.result.index)
    entry = None
    if with_features:
        entry = write_shard(journal.next_shard(), [o.result.index for o in with_features],
                            [by_index[o.result.index].split for o in with_features],
                            [o.encoded for o in with_features], dtype)
    journal.commit(entry, [output_row(by_index[o.result.index], o.result, regen_meta) for o in outcomes])
