"""Regeneration engine `hf`: batched generation with the frozen target's own HF model.

Rows are taken ``window`` at a time, sorted by prompt length inside the window (length
bucketing: rows of a batch need little left padding), and cut into batches of
``batch_size``. A batch runs turn by turn: at turn t every row that still has a user turn
t is rendered with the chat template (history = regenerated replies), left-padded, and
decoded with the KV cache by our own loop (greedy at temperature 0, else sampled with
temperature / top_p / top_k as `deepspec.decoding.sampling` does).

The loop keeps every per-token decision in batched tensor ops: one forward per step for
all live rows, the stop test against the target's EOS ids as one `isin`, and a row that
stops is removed from the batch at once (its KV cache rows, mask and position dropped),
so a batch's cost follows its live rows, not its longest answer. Text is decoded once per
row at the end. A row's greedy answer does not depend on its batch mates (left padding is
masked; only the matmul's rounding order can differ, which fp32 leaves below argmax ties).

dtype: ``dtype="auto"`` runs bf16 on CPUs with bf16 matmul units (AVX512-BF16 or AMX; see
`cpu_bf16_supported`) and on CUDA, else the target's own dtype; the choice is recorded in
``identity`` (answers differ slightly between dtypes, so a resumed run must keep it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import torch

from data_tools.regenerate import InputRow, RowResult, SamplingSettings
from deepspec.eval.dtype import cpu_bf16_flags
from deepspec.targets import release_target

ATTENTION = "deepspec_decode"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_bf16_supported() -> bool:
    """Whether this CPU multiplies bf16 natively (the eval's dtype rule reads the same flags)."""
    return bool(cpu_bf16_flags())


def resolve_dtype(name: str, device: torch.device, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype regeneration runs in for ``regen.dtype=name`` (auto | float32 | bfloat16 | float16)."""
    if name == "auto":
        fast_bf16 = device.type == "cuda" or (device.type == "cpu" and cpu_bf16_supported())
        return torch.bfloat16 if fast_bf16 and model_dtype == torch.float32 else model_dtype
    if name not in DTYPES:
        raise ValueError(f"regen.dtype={name!r}; choose auto or one of {sorted(DTYPES)}")
    return DTYPES[name]


def decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention for `transformers` models that computes one-token decode steps per key/value head.

    query [B, H, 1, d], key/value [B, Hkv, L, d]: the H query heads of a step are viewed as
    [B, Hkv, H/Hkv, d] and multiplied with their shared key/value head directly, with no
    copies of K/V per query head. On a CPU this runs ~10x faster than SDPA's kernel at the
    shapes of batched decoding (bf16, batch 64, L ~ 100). Prompts (several query tokens)
    go to SDPA unchanged.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    B, H, Q, d = query.shape
    if Q != 1 or dropout or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    Hkv = key.shape[1]
    scores = torch.matmul(query.view(B, Hkv, H // Hkv, d), key.transpose(-1, -2)) * (scaling or d ** -0.5)
    if attention_mask is not None:  # [B, 1, 1, L]: bool (True = attend) or additive
        scores = scores.masked_fill(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool \
            else scores + attention_mask
    out = torch.matmul(scores.softmax(-1), value)  # [B, Hkv, H/Hkv, d]
    return out.reshape(B, H, 1, d).transpose(1, 2).contiguous(), None


def use_decode_attention(model) -> None:
    """Switch ``model`` to `decode_attention` (registered with `transformers` under ATTENTION)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION, decode_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
    model.set_attn_implementation(ATTENTION)


class HFEngine:
    """Generate with ``target.model`` (a `FrozenTarget`); see the module docstring."""

    def __init__(self, target, settings: SamplingSettings, batch_size: int = 8, window_batches: int = 4,
                 dtype: str = "auto"):
        if target.tokenizer is None:
            raise ValueError(f"target {target.name} has no tokenizer: set target.tokenizer to regenerate with it")
        if batch_size < 1:
            raise ValueError(f"regen.batch_size={batch_size} must be >= 1")
        self.target = target
        self.settings = settings
        self.batch_size = batch_size
        self.window = batch_size * window_batches
        model_dtype = next(target.model.parameters()).dtype
        self.dtype = resolve_dtype(dtype, torch.device(target.device), model_dtype)
        switch_attention = target.model.config._attn_implementation in ("sdpa", "eager")
        if self.dtype != model_dtype or switch_attention:
            # changed in place below: this engine owns the target, so a later stage of the same process
            # (quickstart's train and eval) loads its own copy in the dtype and attention it asks for
            release_target(target)
        if self.dtype != model_dtype:
            target.model.to(self.dtype)
        if switch_attention:
            use_decode_attention(target.model)
        tok = target.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else target.eos_token_ids[0]
        self.eos_ids = list(target.eos_token_ids)
        thinking_known = "enable_thinking" in (tok.chat_template or "")
        self.identity: dict[str, Any] = {"engine": "hf", **target.identity(),
                                         "dtype": str(self.dtype).removeprefix("torch."),
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
            outputs = self.generate(list(prompts.values()), seed_key=min(prompts))
            for i, (text, n_new, finish, ids) in zip(prompts, outputs, strict=True):
                history[i] = history[i] + [{"role": "assistant", "content": text}]
                results[i].new_tokens += n_new
                results[i].finish_reasons.append(finish)
                results[i].token_ids.append(ids)
            turn += 1
        for i, res in results.items():
            if res.status == "success":
                res.messages = history[i]
        return [results[r.index] for r in rows]

    def generate(self, prompts: list[list[int]], seed_key: int = 0) -> list[tuple[str, int, str, list[int]]]:
        """Answer each of ``prompts`` (token ids): (text, new tokens incl. EOS, stop|length, the answer's
        token ids without the EOS) per prompt."""
        tokens_BN, lengths_B, stopped_B = self.decode(prompts, seed_key)
        results = []
        for row, n, stop in zip(tokens_BN.tolist(), lengths_B.tolist(), stopped_B.tolist(), strict=True):
            kept = row[:n - 1] if stop else row[:n]
            text = self.target.tokenizer.decode(kept, skip_special_tokens=True)
            results.append((text, n, "stop" if stop else "length", kept))
        return results

    @torch.no_grad()
    def decode(self, prompts: list[list[int]], seed_key: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batched KV-cache decoding of left-padded ``prompts``.

        Returns tokens_BN (new tokens, pad after the end), lengths_B (new tokens per row, the
        EOS included) and stopped_B (True where the row ended at an EOS id).
        """
        from transformers import DynamicCache

        from deepspec.decoding.sampling import SamplingParams, next_tokens

        s = self.settings
        device = torch.device(self.target.device)
        B, width = len(prompts), max(len(p) for p in prompts)
        max_new = min(s.max_new_tokens, s.max_seq_len - width)
        ids_BT = torch.full((B, width), self.pad_id, dtype=torch.long)
        mask_BT = torch.zeros((B, width), dtype=torch.long)
        for b, p in enumerate(prompts):
            ids_BT[b, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask_BT[b, width - len(p):] = 1
        ids_BT, mask_BT = ids_BT.to(device), mask_BT.to(device)
        params = SamplingParams(s.temperature, s.top_p, s.top_k)
        generator = None
        if not params.greedy:
            digest = hashlib.blake2b(f"{s.seed}:{seed_key}".encode(), digest_size=8).digest()
            generator = torch.Generator(device=device).manual_seed(int.from_bytes(digest, "big") % 2**63)
        eos = torch.tensor(self.eos_ids, device=device)

        tokens_BN = torch.full((B, max_new), self.pad_id, dtype=torch.long, device=device)
        lengths_B = torch.full((B,), max_new, dtype=torch.long, device=device)
        stopped_B = torch.zeros(B, dtype=torch.bool, device=device)
        live = torch.arange(B, device=device)  # original row of each live row
        position_L = mask_BT.sum(-1)  # the next token's position (left padding not counted)
        cache = DynamicCache()
        model = self.target.model
        positions_BT = (mask_BT.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids_BT, attention_mask=mask_BT, position_ids=positions_BT, cache=cache,
                    use_cache=True, logits_to_keep=1)
        for step in range(max_new):
            token_L = next_tokens(out.logits[:, -1].float(), params, generator)
            tokens_BN[live, step] = token_L
            done_L = torch.isin(token_L, eos)
            if step == max_new - 1:
                stopped_B[live[done_L]] = True
                break
            if done_L.any():  # drop finished rows from everything the next step reads
                stopped_B[live[done_L]] = True
                lengths_B[live[done_L]] = step + 1
                keep = (~done_L).nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
                cache.batch_select_indices(keep)
                live, token_L = live[keep], token_L[keep]
                mask_BT, position_L = mask_BT[keep], position_L[keep]
            mask_BT = torch.cat([mask_BT, mask_BT.new_ones(len(live), 1)], dim=1)
            out = model(input_ids=token_L[:, None], attention_mask=mask_BT, position_ids=position_L[:, None],
                        cache=cache, use_cache=True)
            position_L = position_L + 1
        return tokens_BN.cpu(), lengths_B.cpu(), stopped_B.cpu()
