"""A KV-cached target for a batch of requests whose lengths differ: prefill, step, commit (rollback).

One `TargetSession` holds one `transformers` DynamicCache for B requests. Slots of the cache
are shared across the batch (slot s of every request was written by the same forward), but
each request keeps its own validity mask over the slots and its own next position:

- `prefill(prompts)` left-pads the prompts (pad slots invalid) and runs them once;
- `step(tokens_BT)` appends T slots per request at positions next_pos_B .. next_pos_B+T-1 and
  returns the tapped features and final hidden states of those T tokens;
- `commit(keep_B)` keeps the first keep_B[b] of the last step's slots of request b and marks
  the rest invalid (the rollback of rejected drafts). Trailing slots no request kept are
  cropped from the cache; holes left inside are masked out of attention and squeezed out by
  `compact()` once they pile up.

With B = 1 there are never holes (the rejected tail is cropped), so attention runs without a
mask, exactly as plain decoding. Holes and cropping need a cache whose layers are plain
`DynamicLayer`s (Llama, Qwen3, ... families). Other caches (sliding-window layers, DeepSeek-V4's
compressed HCA/CSA layers, whose state cannot be cut back) roll back by *snapshot and replay*:
the cache is copied before each step, and a commit that keeps fewer tokens than the step ran
restores the copy and runs the kept tokens again — exact, one extra forward per rejection,
batch size 1 only.

Same numbers as plain decoding (batch 1). A verification pass scores gamma + 1 tokens in one
forward; plain decoding scores them one forward each. Every matmul of the model gives each row
the same result whatever the number of rows, but the CPU attention kernel does not: a query
row attending over the cache with the later rows masked out is summed in another order than
the same row attending over exactly its prefix. In float32 the difference is ~1e-6 and almost
never moves an argmax; in bf16 it reaches tenths of a logit and greedy outputs diverge. So the
session runs the target's attention through `row_exact_attention`: at batch 1, each query row
of a multi-token step over a cache attends over exactly its own prefix, the very call a decode
step makes. Greedy speculative output then equals greedy target-only output token for token in
any dtype. Larger batches keep one masked call (their padding masks differ between the two
decoders anyway). The matmuls need the same care in bf16/fp16: on CPU a single-row matmul takes
a kernel of its own (float32 accumulation, one rounding) while two or more rows share another,
so a half-precision session runs every single-row linear layer (LM head included, through
`TargetSession.logits`) on that row twice and keeps one: a decode step's rows then get the
numbers a verification pass gives them.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from deepspec.targets.frozen import FrozenTarget

ROW_EXACT = "deepspec_row_exact"


def row_exact_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        is_causal=None, **kwargs):
    """`transformers` SDPA attention for cached steps: batch-1 rows over their own prefix, fp16/bf16 in fp32.

    Steps over a cache in bf16/fp16 on CPU attend in float32 (the CPU's half-precision attention
    kernel costs ~7x the float32 one for a single query row); the prefill keeps the model's dtype.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    B, _, Q, _ = query.shape
    S = key.shape[2]
    dtype = query.dtype
    if Q < S and query.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        query, key, value = query.float(), key.float(), value.float()
    if B != 1 or Q == 1 or Q >= S or kwargs.get("position_bias") is not None:
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                        scaling=scaling, is_causal=is_causal, **kwargs)
        return out.to(dtype), None
    if attention_mask is None:
        lengths = [S - Q + 1 + i for i in range(Q)]
    else:  # a causal mask over [cache; step]: row i sees a prefix of the keys (batch 1 has no holes)
        lengths = attention_mask[0, 0].sum(-1).tolist()
    rows = [sdpa_attention_forward(module, query[:, :, i:i + 1], key[:, :, :n], value[:, :, :n], None,
                                   dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)[0]
            for i, n in enumerate(int(n) for n in lengths)]
    return torch.cat(rows, dim=1).to(dtype), None


class _SingleRowPad:
    """Forward hooks on every nn.Linear of a model: while `active`, a 1-row input runs as 2 identical rows."""

    def __init__(self, model: torch.nn.Module):
        self.active = False
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_pre_hook(self._pad)
                module.register_forward_hook(self._unpad)

    def _pad(self, module, args):
        x = args[0]
        if not self.active or x.dim() < 2 or x.shape[:-1].numel() != 1:
            return None
        module._deepspec_padded = True
        return (torch.cat([x, x], dim=-2), *args[1:])

    def _unpad(self, module, args, output):
        if module.__dict__.pop("_deepspec_padded", False):
            return output[..., :1, :]
        return None


def single_row_pad(model: torch.nn.Module) -> _SingleRowPad:
    """The model's `_SingleRowPad` (hooks registered once per model)."""
    pad = getattr(model, "_deepspec_single_row_pad", None)
    if pad is None:
        pad = _SingleRowPad(model)
        object.__setattr__(model, "_deepspec_single_row_pad", pad)
    return pad


def _register_row_exact() -> None:
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(ROW_EXACT, row_exact_attention)
    AttentionMaskInterface.register(ROW_EXACT, sdpa_mask)


@dataclass
class StepOutput:
    """Features of the tokens just run, aligned with the input (row t = token t of each request)."""

    final_BTD: torch.Tensor  # post final norm, pre LM head
    taps_BTMD: torch.Tensor | None = None  # None when the session taps no layers


class TargetSession:
    """Batched KV-cached target decoding with per-request rollback (see module docstring)."""

    def __init__(self, target: FrozenTarget, layer_ids: Sequence[int] = (), compact_fraction: float = 0.5):
        from transformers import DynamicCache

        self.target = target
        self.layer_ids = list(layer_ids)
        self.cache = DynamicCache(config=target.model.config)
        self.valid_BS: torch.Tensor | None = None  # bool, slot validity per request
        self.next_pos_B: torch.Tensor | None = None  # next position id per request
        self.last_width = 0  # slots appended by the last step (what commit() may roll back)
        self.compact_fraction = compact_fraction
        layers = getattr(self.cache, "layers", None) or []
        self.croppable = bool(layers) and all(type(layer).__name__ == "DynamicLayer" for layer in layers)
        self._snapshot = None  # replay mode: (cache copy, input ids, positions) of the last step
        half = target.model.dtype in (torch.bfloat16, torch.float16)
        self._row_pad = single_row_pad(target.model) if half else None

    def logits(self, final_BTD: torch.Tensor) -> torch.Tensor:
        """Target logits of final hidden states, with the same matmul numerics as the session's forwards."""
        with self._exact():
            return self.target.logits(final_BTD)

    # -- forward ------------------------------------------------------------------------------
    def _forward(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor | None,
                 position_ids_BT: torch.Tensor) -> StepOutput:
        with self._exact():
            return self._forward_model(input_ids_BT, attention_mask_BT, position_ids_BT)

    @contextlib.contextmanager
    def _exact(self):
        """Row-exact attention and (half precision) single-row matmul padding, for this forward only."""
        config = self.target.model.config
        swap = config._attn_implementation == "sdpa"
        if swap:
            _register_row_exact()
            config._attn_implementation = ROW_EXACT
        if self._row_pad is not None:
            self._row_pad.active = True
        try:
            yield
        finally:
            if swap:
                config._attn_implementation = "sdpa"
            if self._row_pad is not None:
                self._row_pad.active = False

    def _forward_model(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor | None,
                       position_ids_BT: torch.Tensor) -> StepOutput:
        if self.layer_ids:
            out = self.target.forward(input_ids_BT, self.layer_ids, attention_mask_BT=attention_mask_BT,
                                      position_ids_BT=position_ids_BT, past_key_values=self.cache,
                                      use_cache=True)
            return StepOutput(final_BTD=out.final_BTD, taps_BTMD=out.taps_BTMD)
        with torch.no_grad():  # plain decoding: no taps
            out = self.target.model.get_decoder()(input_ids=input_ids_BT, attention_mask=attention_mask_BT,
                                                  position_ids=position_ids_BT, past_key_values=self.cache,
                                                  use_cache=True)
        return StepOutput(final_BTD=out.last_hidden_state)

    @property
    def batch_size(self) -> int:
        return 0 if self.valid_BS is None else self.valid_BS.shape[0]

    @property
    def num_slots(self) -> int:
        return 0 if self.valid_BS is None else self.valid_BS.shape[1]

    def prefill(self, prompts: list[list[int]]) -> StepOutput:
        """Run the prompts (left-padded); returns features LEFT-aligned: row t = prompt token t (pads last)."""
        if self.valid_BS is not None:
            raise RuntimeError("TargetSession.prefill: this session already holds requests; make a new one")
        if not prompts or min(len(p) for p in prompts) < 1:
            raise ValueError("TargetSession.prefill: every prompt needs at least one token")
        device = self.target.device
        B, T = len(prompts), max(len(p) for p in prompts)
        lengths_B = torch.tensor([len(p) for p in prompts], device=device)
        pad_B = T - lengths_B
        ids_BT = torch.zeros(B, T, dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            ids_BT[b, T - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        t = torch.arange(T, device=device)
        valid_BT = t[None, :] >= pad_B[:, None]
        pos_BT = (t[None, :] - pad_B[:, None]).clamp_min(0)
        mask = None if bool(valid_BT.all()) else valid_BT.long()
        out = self._forward(ids_BT, mask, pos_BT)
        self.valid_BS, self.next_pos_B, self.last_width = valid_BT, lengths_B.clone(), T
        index_BT = (t[None, :] + pad_B[:, None]).clamp_max(T - 1)  # left-align the rows
        final = out.final_BTD.gather(1, index_BT[:, :, None].expand(-1, -1, out.final_BTD.shape[-1]))
        taps = None
        if out.taps_BTMD is not None:
            M, D = out.taps_BTMD.shape[2:]
            taps = out.taps_BTMD.gather(1, index_BT[:, :, None, None].expand(-1, -1, M, D))
        return StepOutput(final_BTD=final, taps_BTMD=taps)

    def step(self, input_ids_BT: torch.Tensor) -> StepOutput:
        """Append T tokens per request at its next positions; call commit() before the next step."""
        if self.valid_BS is None:
            raise RuntimeError("TargetSession.step: call prefill() first")
        B, T = input_ids_BT.shape
        if B != self.batch_size:
            raise ValueError(f"TargetSession.step: input has {B} rows; the session holds {self.batch_size}")
        pos_BT = self.next_pos_B[:, None] + torch.arange(T, device=input_ids_BT.device)
        mask = None
        if not bool(self.valid_BS.all()):
            mask = torch.cat([self.valid_BS, self.valid_BS.new_ones(B, T)], dim=1).long()
        if not self.croppable and T > 1:
            if B != 1:
                raise ValueError(f"{type(self.target.model).__name__}'s KV cache cannot be cropped; speculative "
                                 f"decoding with it supports eval.batch_size=1 only (got {B} requests)")
            self._snapshot = (copy.deepcopy(self.cache), input_ids_BT, pos_BT)
        out = self._forward(input_ids_BT, mask, pos_BT)
        self.valid_BS = torch.cat([self.valid_BS, self.valid_BS.new_ones(B, T)], dim=1)
        self.last_width = T
        return out

    # -- rollback -----------------------------------------------------------------------------
    def commit(self, keep_B: torch.Tensor) -> None:
        """Keep the first keep_B[b] tokens of the last step for request b; roll back the rest."""
        T = self.last_width
        keep_B = keep_B.to(self.valid_BS.device).long()
        if bool((keep_B < 0).any()) or bool((keep_B > T).any()):
            raise ValueError(f"TargetSession.commit: keep_B {keep_B.tolist()} must lie in [0, {T}] "
                             f"(the width of the last step)")
        S = self.num_slots
        t = torch.arange(T, device=keep_B.device)
        self.valid_BS[:, S - T:] = t[None, :] < keep_B[:, None]
        self.next_pos_B = self.next_pos_B + keep_B
        drop = T - int(keep_B.max())
        if drop > 0:
            self.valid_BS = self.valid_BS[:, :S - drop]
            if self.croppable:
                self.cache.crop(-drop)
            else:
                self._replay(int(keep_B.max()))
        self.last_width, self._snapshot = 0, None
        holes = int((~self.valid_BS).sum(dim=1).min())  # slots every request could lose
        if self.batch_size > 1 and holes > self.compact_fraction * self.num_slots and holes >= 16:
            self.compact()

    def _replay(self, keep: int) -> None:
        """Snapshot-and-replay rollback: restore the cache from before the step, re-run `keep` tokens."""
        if self._snapshot is None:
            raise RuntimeError(f"TargetSession.commit: cannot roll back a cache of "
                               f"{type(self.target.model).__name__} without a snapshot of the last step")
        self.cache, input_ids_BT, pos_BT = self._snapshot
        if keep > 0:
            with torch.no_grad():
                self.target.model.get_decoder()(input_ids=input_ids_BT[:, :keep], position_ids=pos_BT[:, :keep],
                                                past_key_values=self.cache, use_cache=True)

    def compact(self) -> None:
        """Squeeze invalid slots out of the cache (left-padding each request to the longest)."""
        layers = getattr(self.cache, "layers", [])
        if any(type(layer).__name__ != "DynamicLayer" for layer in layers):
            return  # only plain KV layers can be re-indexed; the mask keeps decoding correct anyway
        B, S = self.valid_BS.shape
        n_B = self.valid_BS.sum(dim=1)
        S_new = int(n_B.max())
        # stable order: invalid slots first, valid ones in their original order
        order_BS = torch.argsort(self.valid_BS.long(), dim=1, stable=True)
        index_BS = order_BS[:, S - S_new:]
        for layer in layers:
            if layer.keys is None or layer.keys.numel() == 0:
                continue
            idx = index_BS[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
            layer.keys = layer.keys.gather(2, idx.to(layer.keys.device))
            layer.values = layer.values.gather(2, idx.to(layer.values.device))
        self.valid_BS = self.valid_BS.gather(1, index_BS)
