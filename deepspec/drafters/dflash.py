"""DFlash: parallel block drafter (docs/algorithms.md) and its inference state.

One forward drafts a whole block: inputs [anchor, mask x (K-1)] at positions anchor..anchor+K-1,
attention keys/values [W_K H_ctx; W_K H_blk] where H_ctx = RMSNorm(W_c [taps]) of every token
before the anchor. Output slot k predicts the token at anchor+k+1 through the target's frozen
LM head. DSpark (dspark.py) reuses this backbone and adds its sequential head.

Training: `forward(PackedBatch) -> DraftOutput`. Inference: `new_state(...) -> BlockDraftState`,
`state.extend(taps, lengths)`, `state.crop(lengths)`, `propose(state, anchors, ...) -> Proposal`.
The two paths share every op, and tests check they give the same distributions.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from deepspec.drafters.base import DraftOutput, Proposal, SharedTargetMixin, draw
from deepspec.drafters.block_attention import block_attend
from deepspec.drafters.layers import ContextFusion, LayerDims, RMSNorm, build_layers, sdpa_gqa
from deepspec.drafters.packing import PackedBatch
from deepspec.drafters.spec import DrafterSpec, resolve_spec
from deepspec.targets.shapes import TargetShapes


def layer_dims(spec: DrafterSpec, shapes: TargetShapes) -> LayerDims:
    """Draft layer geometry from a resolved spec and the target's shapes."""
    return LayerDims(hidden_size=shapes.hidden_size, num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
                     head_dim=spec.head_dim, intermediate_size=spec.intermediate_size,
                     rms_norm_eps=shapes.rms_norm_eps, rope_theta=shapes.rope_theta,
                     qk_norm=shapes.qk_norm if spec.qk_norm is None else spec.qk_norm,
                     sliding_window=spec.sliding_window)


class DFlashDrafter(SharedTargetMixin, nn.Module):
    """Context fusion + `num_layers` draft decoder layers + final RMSNorm."""

    def __init__(self, spec: DrafterSpec, shapes: TargetShapes):
        super().__init__()
        self.spec = resolve_spec(spec, shapes)
        self.shapes = shapes
        self.dims = layer_dims(self.spec, shapes)
        self.fuse = ContextFusion(len(self.spec.layer_ids), shapes.hidden_size, shapes.rms_norm_eps)
        self.layers = build_layers(self.spec.backbone, self.dims, self.spec.num_layers)
        self.norm = RMSNorm(shapes.hidden_size, shapes.rms_norm_eps)

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    # ---- training --------------------------------------------------------------------------
    def backbone(self, batch: PackedBatch) -> Tensor:
        """hidden_NKD after the final RMSNorm (ready for the frozen LM head)."""
        attend = block_attend(batch, self.spec.sliding_window, self.spec.attention, self.dims.head_dim)
        ctx = self.fuse(batch.ctx_taps_CMD)
        x = self.embed(batch.block_ids_NK, self.dtype)
        for layer in self.layers:
            ctx_k, ctx_v = layer.project_ctx(ctx, batch.ctx_pos_C)
            x = layer(x, batch.block_pos_NK, ctx_k, ctx_v, attend)
        return self.norm(x)

    def forward(self, batch: PackedBatch) -> DraftOutput:
        return DraftOutput(hidden_NKD=self.backbone(batch))

    # ---- inference -------------------------------------------------------------------------
    def new_state(self, batch_size: int, max_len: int, device=None) -> BlockDraftState:
        return BlockDraftState(self, batch_size, max_len, device or self.norm.weight.device)

    @torch.no_grad()
    def block_hidden(self, state: BlockDraftState, anchor_tokens_B: Tensor, anchor_pos_B: Tensor) -> Tensor:
        """Backbone over one block per request: hidden_BKD (after the final norm)."""
        B, K = anchor_tokens_B.shape[0], self.spec.block_size
        if bool((anchor_pos_B > state.lengths_B).any()):
            raise ValueError(f"propose: anchor_pos_B {anchor_pos_B.tolist()} beyond the context held in the "
                             f"state {state.lengths_B.tolist()}; extend the state with the target features first")
        ids = torch.full((B, K), self.spec.mask_token_id, dtype=torch.long, device=anchor_tokens_B.device)
        ids[:, 0] = anchor_tokens_B
        pos = anchor_pos_B[:, None] + torch.arange(K, device=ids.device)
        L = max(int(state.lengths_B.max()), 1)
        cpos = torch.arange(L, device=ids.device)
        ctx_ok = (cpos[None, :] < anchor_pos_B[:, None])[:, None, :].expand(B, K, L)
        if self.spec.sliding_window is not None:
            ctx_ok = ctx_ok & ((pos[:, :, None] - cpos[None, None, :]) < self.spec.sliding_window)
        mask = torch.cat([ctx_ok, ctx_ok.new_ones(B, K, K)], dim=-1)

        def attend(q, k_blk, v_blk, ctx_k, ctx_v):
            k = torch.cat([ctx_k[:, :, :L], k_blk.transpose(1, 2)], dim=2)
            v = torch.cat([ctx_v[:, :, :L], v_blk.transpose(1, 2)], dim=2)
            return sdpa_gqa(q.transpose(1, 2), k, v, mask).transpose(1, 2)

        x = self.embed(ids, self.dtype)
        for layer, ck, cv in zip(self.layers, state.k_cache, state.v_cache, strict=True):
            x = layer(x, pos, ck, cv, attend)
        return self.norm(x)

    @torch.no_grad()
    def propose(self, state: BlockDraftState, anchor_tokens_B: Tensor, anchor_pos_B: Tensor, greedy: bool = True,
                temperature: float = 1.0, generator: Optional[torch.Generator] = None,
                forced_tokens_BK: Optional[Tensor] = None) -> Proposal:
        """Draft K tokens after each request's anchor (context = every position < anchor_pos)."""
        hidden = self.block_hidden(state, anchor_tokens_B, anchor_pos_B)
        logits = self.target_logits(hidden)
        tokens, probs = draw(logits.flatten(0, 1), greedy, temperature, generator,
                             None if forced_tokens_BK is None else forced_tokens_BK.flatten())
        B = hidden.shape[0]
        return Proposal(tokens_BK=tokens.view(B, -1), draft_probs_BKV=probs.view(B, hidden.shape[1], -1))


class BlockDraftState:
    """Per-request projected context of a DFlash/DSpark drafter: each layer's ctx K/V.

    k_cache/v_cache[layer]: [B, Hkv, max_len, hd] (RoPE applied); lengths_B: tokens held.
    """

    def __init__(self, drafter: DFlashDrafter, batch_size: int, max_len: int, device):
        d = drafter.dims
        self.drafter, self.max_len = drafter, max_len
        shape = (batch_size, d.num_kv_heads, max_len, d.head_dim)
        self.k_cache = [torch.zeros(shape, device=device, dtype=drafter.dtype) for _ in drafter.layers]
        self.v_cache = [torch.zeros(shape, device=device, dtype=drafter.dtype) for _ in drafter.layers]
        self.lengths_B = torch.zeros(batch_size, dtype=torch.long, device=device)

    @torch.no_grad()
    def extend(self, taps_BTMD: Tensor, lengths_B: Tensor, tokens_BT: Optional[Tensor] = None) -> None:
        """Append the first lengths_B[b] rows of taps_BTMD[b] (newly committed tokens' target features).

        `tokens_BT` is accepted for interface parity with Eagle3 and ignored.
        """
        B, T = taps_BTMD.shape[:2]
        lengths_B = lengths_B.to(self.lengths_B.device)
        if bool((self.lengths_B + lengths_B > self.max_len).any()):
            raise ValueError(f"extend: state holds at most {self.max_len} tokens per request; lengths "
                             f"{self.lengths_B.tolist()} + {lengths_B.tolist()} exceed it (make a larger state)")
        t = torch.arange(T, device=self.lengths_B.device)
        pos_BT = self.lengths_B[:, None] + t
        keep = t[None, :] < lengths_B[:, None]
        b_idx, t_idx = keep.nonzero(as_tuple=True)
        ctx = self.drafter.fuse(taps_BTMD[b_idx, t_idx])  # [n, D]
        p = pos_BT[b_idx, t_idx]
        for layer, kc, vc in zip(self.drafter.layers, self.k_cache, self.v_cache, strict=True):
            k, v = layer.project_ctx(ctx, p)  # [n, Hkv, hd]
            kc[b_idx, :, p] = k.to(kc.dtype)
            vc[b_idx, :, p] = v.to(vc.dtype)
        self.lengths_B = self.lengths_B + lengths_B

    def crop(self, lengths_B: Tensor) -> None:
        """Keep only the first lengths_B[b] tokens of each request (roll back)."""
        self.lengths_B = torch.minimum(self.lengths_B, lengths_B.to(self.lengths_B.device))
