"""Building blocks of the draft decoder layers, in the target family's shapes.

RMSNorm, RoPE with explicit positions, GQA attention whose queries come from the draft
block and whose keys/values are [W_K H_ctx; W_K H_blk] (optional Qwen3 q/k-norm), SwiGLU
MLP, the pre-norm decoder layer, and the context fusion H_ctx = RMSNorm(W_c [H(l1);...]).

Attention is split from the mask: a layer projects q/k/v and calls an `attend` function
that knows the layout (packed training blocks or a padded inference cache). Layers are
built through `BACKBONES[spec.backbone]`, so a different layer type (e.g. a DeepSeek-V4
MoE + mHC + sliding-window layer) can be registered without touching DFlash/DSpark code:
it must offer `project_ctx(ctx_CD, ctx_pos_C) -> (k, v)` and
`forward(x, pos, ctx_k, ctx_v, attend) -> x`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class LayerDims:
    """Geometry of one draft decoder layer."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    qk_norm: bool = False
    sliding_window: Optional[int] = None


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(pos: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin tables [..., head_dim] for integer positions `pos` [...] (HF rotate-half layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim))
    freqs = pos.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [..., H, hd] by cos/sin [..., hd] (broadcast over the head axis)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


# attend(q [..., Q, H, hd], k_blk [..., Q, Hkv, hd], v_blk, ctx_k, ctx_v) -> out [..., Q, H, hd]
AttendFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


class DraftAttention(nn.Module):
    """GQA projections with RoPE (and q/k RMSNorm for Qwen3-style targets)."""

    def __init__(self, dims: LayerDims, in_dim: Optional[int] = None):
        super().__init__()
        in_dim = in_dim or dims.hidden_size
        self.dims = dims
        self.q_proj = nn.Linear(in_dim, dims.num_heads * dims.head_dim, bias=False)
        self.k_proj = nn.Linear(in_dim, dims.num_kv_heads * dims.head_dim, bias=False)
        self.v_proj = nn.Linear(in_dim, dims.num_kv_heads * dims.head_dim, bias=False)
        self.o_proj = nn.Linear(dims.num_heads * dims.head_dim, dims.hidden_size, bias=False)
        self.q_norm = RMSNorm(dims.head_dim, dims.rms_norm_eps) if dims.qk_norm else None
        self.k_norm = RMSNorm(dims.head_dim, dims.rms_norm_eps) if dims.qk_norm else None

    def _rope(self, x: Tensor, pos: Tensor) -> Tensor:
        cos, sin = rope_cos_sin(pos, self.dims.head_dim, self.dims.rope_theta)
        return apply_rope(x, cos, sin)

    def project_q(self, x: Tensor, pos: Tensor) -> Tensor:
        q = self.q_proj(x).unflatten(-1, (self.dims.num_heads, self.dims.head_dim))
        if self.q_norm is not None:
            q = self.q_norm(q)
        return self._rope(q, pos)

    def project_kv(self, x: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        k = self.k_proj(x).unflatten(-1, (self.dims.num_kv_heads, self.dims.head_dim))
        v = self.v_proj(x).unflatten(-1, (self.dims.num_kv_heads, self.dims.head_dim))
        if self.k_norm is not None:
            k = self.k_norm(k)
        return self._rope(k, pos), v


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDraftLayer(nn.Module):
    """Pre-norm decoder layer; keys/values = [projected context; block] (DFlash §2.1)."""

    def __init__(self, dims: LayerDims, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(dims.hidden_size, dims.rms_norm_eps)
        self.self_attn = DraftAttention(dims)
        self.post_attention_layernorm = RMSNorm(dims.hidden_size, dims.rms_norm_eps)
        self.mlp = SwiGLU(dims.hidden_size, dims.intermediate_size)

    def project_ctx(self, ctx_CD: Tensor, ctx_pos_C: Tensor) -> tuple[Tensor, Tensor]:
        """This layer's W_K H_ctx, W_V H_ctx (RoPE at the context positions): [..., C, Hkv, hd]."""
        return self.self_attn.project_kv(ctx_CD, ctx_pos_C)

    def forward(self, x: Tensor, pos: Tensor, ctx_k: Tensor, ctx_v: Tensor, attend: AttendFn) -> Tensor:
        h = self.input_layernorm(x)
        q = self.self_attn.project_q(h, pos)
        k, v = self.self_attn.project_kv(h, pos)
        out = attend(q, k, v, ctx_k, ctx_v).flatten(-2)
        x = x + self.self_attn.o_proj(out)
        return x + self.mlp(self.post_attention_layernorm(x))


class ContextFusion(nn.Module):
    """H_ctx = RMSNorm(W_c [H(l1); ...; H(lm)]): taps [..., m, D] -> [..., D], shared by all layers."""

    def __init__(self, num_taps: int, hidden: int, eps: float):
        super().__init__()
        self.fc = nn.Linear(num_taps * hidden, hidden, bias=False)
        self.norm = RMSNorm(hidden, eps)

    def forward(self, taps_XMD: Tensor) -> Tensor:
        return self.norm(self.fc(taps_XMD.flatten(-2).to(self.fc.weight.dtype)))


BACKBONES: dict[str, Callable[[LayerDims, int], nn.Module]] = {"llama": LlamaDraftLayer}


def build_layers(backbone: str, dims: LayerDims, num_layers: int) -> nn.ModuleList:
    """Draft decoder layers from the `BACKBONES` registry."""
    if backbone not in BACKBONES:
        raise ValueError(f"drafter.backbone={backbone!r} is not registered; known: {sorted(BACKBONES)}")
    return nn.ModuleList(BACKBONES[backbone](dims, i) for i in range(num_layers))


def sdpa_gqa(q_HQd: Tensor, k_GKd: Tensor, v_GKd: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Scaled dot-product attention with grouped KV heads (leading batch dims allowed).

    q [..., H, Q, hd], k/v [..., Hkv, S, hd], mask bool [..., Q, S] (True = attend).
    """
    if mask is not None:
        mask = mask.unsqueeze(-3)
    gqa = q_HQd.shape[-3] != k_GKd.shape[-3]
    return F.scaled_dot_product_attention(q_HQd, k_GKd, v_GKd, attn_mask=mask, enable_gqa=gqa)
