"""Regeneration engine `hf`: batched generation with the frozen target's own HF model.

Rows are taken ``window`` at a time, sorted by prompt length inside the window (less
padding), and cut into batches of ``batch_size``. A batch runs turn by turn: at turn t
every row that still has a user turn t is rendered with the chat template (history =
regenerated replies), left-padded, and generated with the KV cache (`model.generate`),
greedy at temperature 0, else sampled with temperature / top_p / top_k. Generation of a
row stops at any of the target's EOS ids. Results are yielded per batch, so the caller's
journal advances batch by batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import torch

from data_tools.regenerate import InputRow, RowResult, SamplingSettings


class HFEngine:
    """Generate with ``target.model`` (a `FrozenTarget`); see the module docstring."""

    def __init__(self, target, settings: SamplingSettings, batch_size: int = 8, window_batches: int = 4):
        if target.tokenizer is None:
            raise ValueError(f"target {target.name} has no tokenizer: set target.tokenizer to regenerate with it")
        if batch_size < 1:
            raise ValueError(f"regen.batch_size={batch_size} must be >= 1")
        self.target = target
        self.settings = settings
        self.batch_size = batch_size
        self.window = batch_size * window_batches
        tok = target.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else target.eos_token_ids[0]
        self.eos_ids = target.eos_token_ids
        thinking_known = "enable_thinking" in (tok.chat_template or "")
        self.identity: dict[str, Any] = {"engine": "hf", **target.identity(),
                                         "template_reads_thinking": thinking_known}

    # -- rendering ------------------------------------------------------------------------
    def prompt_ids(self, history: list[dict[str, Any]]) -> list[int]:
        text = self.target.render_chat(history, add_generation_prompt=True, enable_thinking=self.settings.thinking)
        return self.target.tokenizer(text, add_special_tokens=False).input_ids

    # -- driver ---------------------------------------------------------------------------
    def generate_rows(self, rows: list[InputRow]) -> Iterator[RowResult]:
        for start in range(0, len(rows), self.window):
            window = rows[start:start + self.window]
            lengths = {}
            for r in window:
                segments = r.segments(self.settings.max_turns)
                lengths[r.index] = len(self.prompt_ids(segments[0])) if segments else 0
            window = sorted(window, key=lambda r: lengths[r.index])
            for b in range(0, len(window), self.batch_size):
                batch = window[b:b + self.batch_size]
                try:
                    yield from self._run_batch(batch)
                except (RuntimeError, ValueError) as exc:  # one bad batch must not end the run
                    for r in batch:
                        yield RowResult(r.index, "error", reason=f"{type(exc).__name__}: {exc}")

    def _run_batch(self, rows: list[InputRow]) -> list[RowResult]:
        s = self.settings
        segments = {r.index: r.segments(s.max_turns) for r in rows}
        history: dict[int, list[dict[str, Any]]] = {r.index: [] for r in rows}
        results = {r.index: RowResult(r.index, "success") for r in rows}
        active = [r.index for r in rows]
        turn = 0
        while active:
            prompts = {}
            for i in list(active):
                if turn >= len(segments[i]):
                    active.remove(i)
                    continue
                conv = history[i] + segments[i][turn]
                ids = self.prompt_ids(conv)
                if len(ids) >= s.max_seq_len:  # no room for a single new token
                    if turn == 0:
                        results[i] = RowResult(i, "skipped", reason="prompt_too_long")
                    else:
                        results[i].turns_dropped = len(segments[i]) - turn
                    active.remove(i)
                    continue
                history[i] = conv
                prompts[i] = ids
            if not prompts:
                break
            outputs = self._generate(list(prompts.values()), seed_key=min(prompts))
            for i, (text, n_new, finish) in zip(prompts, outputs, strict=True):
                history[i] = history[i] + [{"role": "assistant", "content": text}]
                results[i].new_tokens += n_new
                results[i].finish_reasons.append(finish)
            turn += 1
        for i, res in results.items():
            if res.status == "success":
                res.messages = history[i]
        return [results[r.index] for r in rows]

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], seed_key: int) -> list[tuple[str, int, str]]:
        """Generate for left-padded ``prompts``: (text, new tokens, stop|length) per prompt."""
        s = self.settings
        width = max(len(p) for p in prompts)
        max_new = min(s.max_new_tokens, s.max_seq_len - width)
        ids_BT = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask_BT = torch.zeros((len(prompts), width), dtype=torch.long)
        for b, p in enumerate(prompts):
            ids_BT[b, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask_BT[b, width - len(p):] = 1
        kwargs: dict[str, Any] = {"max_new_tokens": max_new, "eos_token_id": self.eos_ids,
                                  "pad_token_id": self.pad_id}
        if s.temperature > 0:
            kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or None)
            digest = hashlib.blake2b(f"{s.seed}:{seed_key}".encode(), digest_size=8).digest()
            torch.manual_seed(int.from_bytes(digest, "big") % 2**63)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        device = self.target.device
        out_BT = self.target.model.generate(input_ids=ids_BT.to(device), attention_mask=mask_BT.to(device),
                                            **kwargs)
        new_BN = out_BT[:, width:].cpu()
        results = []
        eos = set(self.eos_ids)
        for row in new_BN.tolist():
            stop = next((k for k, t in enumerate(row) if t in eos), None)
            kept = row if stop is None else row[:stop]
            text = self.target.tokenizer.decode(kept, skip_special_tokens=True)
            results.append((text, len(kept) + (stop is not None), "length" if stop is None else "stop"))
        return results
