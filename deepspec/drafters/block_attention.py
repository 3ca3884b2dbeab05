"""Attention of packed training blocks over their context (the `attend` functions of DFlash/DSpark).

Both implementations compute the same thing from the PackedBatch's token indices: block n's
queries see ctx tokens of their own sequence with position < anchor_n (within the sliding
window, if any) and the K slots of block n.

- `sdpa_block_attend`: one scaled-dot-product call per sequence with a bool mask over
  [ctx of s; blocks of s] (`packing.block_attention_masks`). Runs anywhere.
- `flex_block_attend`: one `flex_attention` call over the whole packed batch with a
  block-sparse mask built from the indices (a mask_mod), so fully masked tiles (other
  sequences, other blocks, context after the anchor) cost nothing and no score matrix is
  kept for backward. Compiled on CUDA; lengths are padded to buckets to bound recompiles.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from deepspec.drafters.layers import AttendFn, sdpa_gqa
from deepspec.drafters.packing import PackedBatch, block_attention_masks

_CTX_BUCKET, _QUERY_BUCKET = 512, 128
_compiled_flex = None


def sdpa_block_attend(batch: PackedBatch, sliding_window: Optional[int] = None) -> AttendFn:
    """Per-sequence SDPA with index-built bool masks."""
    masks = block_attention_masks(batch, sliding_window)

    def attend(q, k_blk, v_blk, ctx_k, ctx_v):
        outs, c0, n0 = [], 0, 0
        for C, N, mask in zip(batch.ctx_counts, batch.block_counts, masks, strict=True):
            if N:
                q_s = q[n0:n0 + N].flatten(0, 1).transpose(0, 1)  # [H, N*K, hd]
                k_s = torch.cat([ctx_k[c0:c0 + C], k_blk[n0:n0 + N].flatten(0, 1)]).transpose(0, 1)
                v_s = torch.cat([ctx_v[c0:c0 + C], v_blk[n0:n0 + N].flatten(0, 1)]).transpose(0, 1)
                o = sdpa_gqa(q_s, k_s, v_s, mask)
                outs.append(o.transpose(0, 1).unflatten(0, (N, -1)))
            c0, n0 = c0 + C, n0 + N
        return torch.cat(outs) if outs else torch.zeros_like(q)  # no anchors anywhere in the batch

    return attend


def _round_up(x: int, m: int) -> int:
    return max(m, -(-x // m) * m)


def _pad(t: Tensor, n: int, value) -> Tensor:
    return torch.cat([t, t.new_full((n - t.shape[0], *t.shape[1:]), value)]) if n > t.shape[0] else t


def flex_block_attend(batch: PackedBatch, sliding_window: Optional[int] = None, compiled: bool = True) -> AttendFn:
    """One block-sparse flex_attention over the packed batch (keys [ctx (padded); blocks (padded)])."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _compiled_flex
    fn = flex_attention
    if compiled:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        fn = _compiled_flex
    N, K = batch.block_ids_NK.shape
    C, NK = batch.ctx_pos_C.shape[0], N * K
    Cp, Qp = _round_up(C, _CTX_BUCKET), _round_up(NK, _QUERY_BUCKET)
    dev = batch.block_ids_NK.device
    ctx_seq = _pad(batch.ctx_seq_C, Cp, -1)
    ctx_pos = _pad(batch.ctx_pos_C, Cp, 0)
    q_seq = _pad(batch.block_seq_N.repeat_interleave(K), Qp, -2)
    q_anchor = _pad(batch.anchor_pos_N.repeat_interleave(K), Qp, 0)
    q_pos = _pad(batch.block_pos_NK.reshape(-1), Qp, 0)
    q_block = _pad(torch.arange(N, device=dev).repeat_interleave(K), Qp, -1)
    kv_block = _pad(torch.arange(N, device=dev).repeat_interleave(K), Qp, -2)

    def mask_mod(b, h, qi, ki):
        is_ctx = ki < Cp
        ci = torch.clamp(ki, max=Cp - 1)
        bi = torch.clamp(ki - Cp, min=0)
        ctx_ok = is_ctx & (ctx_seq[ci] == q_seq[qi]) & (ctx_pos[ci] < q_anchor[qi])
        if sliding_window is not None:
            ctx_ok = ctx_ok & ((q_pos[qi] - ctx_pos[ci]) < sliding_window)
        return ctx_ok | (~is_ctx & (kv_block[bi] == q_block[qi]))

    block_mask = create_block_mask(mask_mod, None, None, Qp, Cp + Qp, device=dev)

    def attend(q, k_blk, v_blk, ctx_k, ctx_v):
        qf = _pad(q.flatten(0, 1), Qp, 0.0).transpose(0, 1)[None]  # [1, H, Qp, hd]
        kf = torch.cat([_pad(ctx_k, Cp, 0.0), _pad(k_blk.flatten(0, 1), Qp, 0.0)]).transpose(0, 1)[None]
        vf = torch.cat([_pad(ctx_v, Cp, 0.0), _pad(v_blk.flatten(0, 1), Qp, 0.0)]).transpose(0, 1)[None]
        out = fn(qf, kf, vf, block_mask=block_mask, enable_gqa=qf.shape[1] != kf.shape[1])
        return out[0].transpose(0, 1)[:NK].unflatten(0, (N, K))

    return attend


def block_attend(batch: PackedBatch, sliding_window: Optional[int], impl: str, head_dim: int) -> AttendFn:
    """`impl`: sdpa | flex | auto (flex on CUDA for head_dim >= 16, the compiled kernel's minimum; else sdpa)."""
    if impl == "auto":
        impl = "flex" if batch.block_ids_NK.is_cuda and head_dim >= 16 else "sdpa"
    if impl == "sdpa" or batch.num_blocks == 0:
        return sdpa_block_attend(batch, sliding_window)
    if impl == "flex":
        return flex_block_attend(batch, sliding_window, compiled=batch.block_ids_NK.is_cuda)
    raise ValueError(f"drafter.attention={impl!r}; choose sdpa, flex or auto")
