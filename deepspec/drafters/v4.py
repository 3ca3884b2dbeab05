"""DeepSeek-V4-style DSpark drafter (docs/deepseek_v4.md): MoE + mHC + sliding-window draft layers.

The published DeepSeek-V4-Flash-DSpark drafter is 3 V4 decoder blocks run on the draft block
[anchor, noise x (γ-1)] (γ = 5, noise token 128799), whose attention keys/values are
[W_kv main_x; W_kv block] with main_x = main_norm(main_proj([taps 40, 41, 42])), the taps being
the mean of the target's 4 mHC streams. Here that is `V4DSparkDrafter`, a `DSparkDrafter` whose
layers are `V4DraftLayer` (registered as `BACKBONES["v4"]`, so the packed training forward and the
propose / extend / crop inference path are DFlash's own code):

    block ids -> embed -> expand to hc_mult streams -> V4DraftLayer x L -> hc_head (stream collapse)
      = head hidden h (pre-norm) -> final RMSNorm -> frozen LM head (+ Markov bias)
    confidence c_k = sigmoid(proj([h_k; W1[x_{k-1}]]))   (pre-norm h, no bias, as published)

Reused from `transformers.models.deepseek_v4` (the target's own modules, so V4's maths is exact):
DeepseekV4HyperConnection (attn_hc / ffn_hc: pre / post / Sinkhorn-projected comb weights),
DeepseekV4HyperHead (final stream collapse), DeepseekV4SparseMoeBlock (sqrt-softplus top-k router
with e_score_correction_bias, routed experts as 3-D tensors, shared expert, SwiGLU clamp),
DeepseekV4RMSNorm / UnweightedRMSNorm, DeepseekV4GroupedLinear (grouped low-rank output) and
apply_rotary_pos_emb (interleaved RoPE on the trailing qk_rope_head_dim channels).
Written here: the shared-KV MQA attention split into `project_ctx` (context K=V, cached at
inference) and `forward` (queries from the block, through deepspec's `attend`).

Differences from the published drafter (exact elsewhere; see deepspec/export/v4.py):
- no attention sinks: deepspec's `attend` is a plain softmax. Export writes attn_sink = -1e30
  (exactly "no sink"); import drops published sinks and says so.
- the sliding window is the one deepspec's block masks apply: query slot k sees context position c
  when (anchor + k) - c < w; the published drafter gives every slot the same last w positions
  before the anchor (c >= anchor - w), so here slot k sees k + 1 fewer of the oldest positions.
- routing is V4's top-k ("moe" layer type); hash routing is not used by draft layers.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DeepseekV4Config
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf_v4

from deepspec.drafters.base import DraftOutput
from deepspec.drafters.dflash import BlockDraftState
from deepspec.drafters.dspark import DSparkDrafter
from deepspec.drafters.layers import BACKBONES, AttendFn, LayerDims
from deepspec.drafters.packing import PackedBatch
from deepspec.drafters.spec import DrafterSpec
from deepspec.targets.shapes import TargetShapes

# keys of drafter.backbone_config that deepspec sets itself (from the target and the spec)
_OWNED = ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
          "num_hidden_layers", "layer_types", "mlp_layer_types", "sliding_window", "rms_norm_eps")
_ALLOWED = {f.name for f in fields(DeepseekV4Config)} | {"qk_rope_head_dim", "experts_implementation"}
EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")  # transformers' routed-expert kernels


def v4_config(dims: LayerDims, num_layers: int, options: dict[str, Any] | None = None,
              vocab_size: int = 129280) -> DeepseekV4Config:
    """The DeepseekV4Config of `num_layers` draft layers: geometry from `dims`, the rest from
    `options` (drafter.backbone_config) over transformers' V4-Flash defaults.

    `experts_implementation` picks transformers' routed-expert kernel: eager (a loop over the hit
    experts), grouped_mm (one grouped GEMM; the fast one on H100) or batched_mm -- same numbers.
    """
    options = dict(options or {})
    experts = options.pop("experts_implementation", "eager")
    if experts not in EXPERTS_IMPLEMENTATIONS:
        raise ValueError(f"drafter.backbone_config.experts_implementation={experts!r}; choose one of "
                         f"{EXPERTS_IMPLEMENTATIONS}")
    owned = sorted(set(options) & set(_OWNED))
    unknown = sorted(set(options) - _ALLOWED)
    if owned or unknown:
        raise ValueError(f"drafter.backbone_config: {owned + unknown} cannot be set here "
                         f"({'set by deepspec from the target / drafter spec' if owned else 'not DeepseekV4Config fields'}); "
                         f"use e.g. n_routed_experts, num_experts_per_tok, moe_intermediate_size, hc_mult, "
                         f"q_lora_rank, o_groups, o_lora_rank, qk_rope_head_dim")
    options.setdefault("moe_intermediate_size", dims.intermediate_size)
    cfg = DeepseekV4Config(vocab_size=vocab_size, hidden_size=dims.hidden_size, num_attention_heads=dims.num_heads,
                           num_key_value_heads=1, head_dim=dims.head_dim, num_hidden_layers=num_layers,
                           layer_types=["sliding_attention"] * num_layers, mlp_layer_types=["moe"] * num_layers,
                           sliding_window=dims.sliding_window or 128, rms_norm_eps=dims.rms_norm_eps,
                           rope_theta=dims.rope_theta, **options)
    if (cfg.num_attention_heads * cfg.head_dim) % cfg.o_groups:
        raise ValueError(f"drafter: {cfg.num_attention_heads} heads x head_dim {cfg.head_dim} do not split into "
                         f"backbone_config.o_groups={cfg.o_groups} groups")
    cfg._experts_implementation = experts
    return cfg


class V4DraftAttention(nn.Module):
    """V4 shared-KV MQA (low-rank q, one K=V head, partial interleaved RoPE, grouped low-rank output)."""

    def __init__(self, cfg: DeepseekV4Config):
        super().__init__()
        self.num_heads, self.head_dim, self.o_groups = cfg.num_attention_heads, cfg.head_dim, cfg.o_groups
        rope = cfg.rope_parameters["main"]
        self.rope_dim = int(cfg.head_dim * rope.get("partial_rotary_factor", 1.0))
        self.rope_theta = float(rope["rope_theta"])
        eps = cfg.rms_norm_eps
        self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
        self.q_a_norm = hf_v4.DeepseekV4RMSNorm(cfg.q_lora_rank, eps=eps)
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.num_heads * self.head_dim, bias=False)
        self.q_b_norm = hf_v4.DeepseekV4UnweightedRMSNorm(eps=eps)
        self.kv_proj = nn.Linear(cfg.hidden_size, self.head_dim, bias=False)
        self.kv_norm = hf_v4.DeepseekV4RMSNorm(self.head_dim, eps=eps)
        self.o_a_proj = hf_v4.DeepseekV4GroupedLinear(self.num_heads * self.head_dim // cfg.o_groups,
                                                      cfg.o_groups * cfg.o_lora_rank, cfg.o_groups)
        self.o_b_proj = nn.Linear(cfg.o_groups * cfg.o_lora_rank, cfg.hidden_size, bias=False)

    def _rope(self, x: Tensor, pos: Tensor, inverse: bool = False) -> Tensor:
        """V4 interleaved RoPE on the trailing rope_dim channels of x [..., S, H, hd] (pos [..., S])."""
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, self.rope_dim, 2, device=pos.device,
                                                            dtype=torch.float32) / self.rope_dim))
        freqs = pos.float()[..., None] * inv_freq
        sin = -freqs.sin() if inverse else freqs.sin()
        return hf_v4.apply_rotary_pos_emb(x, freqs.cos(), sin, unsqueeze_dim=-2)

    def project_kv(self, x: Tensor, pos: Tensor) -> Tensor:
        """The single K=V head [..., S, 1, hd], RoPE at `pos`."""
        return self._rope(self.kv_norm(self.kv_proj(x)).unsqueeze(-2), pos)

    def project_q(self, x: Tensor, pos: Tensor) -> Tensor:
        q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x))).unflatten(-1, (self.num_heads, self.head_dim))
        return self._rope(self.q_b_norm(q), pos)

    def output(self, out_SHd: Tensor, pos: Tensor) -> Tensor:
        """Undo the rotation V picked up (K=V), then the grouped low-rank output projection."""
        out = self._rope(out_SHd, pos, inverse=True)
        grouped = self.o_a_proj(out.flatten(-2).unflatten(-1, (self.o_groups, -1)))
        return self.o_b_proj(grouped.flatten(-2))


class V4DraftLayer(nn.Module):
    """One V4 decoder block over mHC streams; keys/values = [W_kv main_x; W_kv block].

    `forward` takes the block as [..., K, D] (first layer: expanded to hc_mult equal streams) or
    as streams [..., K, hc, D], and returns streams. Same interface as `LlamaDraftLayer`.
    """

    def __init__(self, dims: LayerDims, layer_idx: int = 0, config: DeepseekV4Config | None = None):
        super().__init__()
        cfg = config or v4_config(dims, layer_idx + 1)
        self.layer_idx, self.hc_mult = layer_idx, cfg.hc_mult
        self.attn_hc = hf_v4.DeepseekV4HyperConnection(cfg)
        self.input_layernorm = hf_v4.DeepseekV4RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = V4DraftAttention(cfg)
        self.ffn_hc = hf_v4.DeepseekV4HyperConnection(cfg)
        self.post_attention_layernorm = hf_v4.DeepseekV4RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = hf_v4.DeepseekV4SparseMoeBlock(cfg, layer_idx)

    def project_ctx(self, ctx_CD: Tensor, ctx_pos_C: Tensor) -> tuple[Tensor, Tensor]:
        """This layer's context K = V [..., C, 1, hd] from the fused taps main_x (no input norm, as V4)."""
        kv = self.self_attn.project_kv(ctx_CD, ctx_pos_C)
        return kv, kv

    @staticmethod
    def _mix(streams: Tensor, out: Tensor, post: Tensor, comb: Tensor) -> Tensor:
        """mHC: new stream i = post_i * out + sum_j comb[j, i] * stream_j."""
        dtype = streams.dtype
        return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + comb.to(dtype).transpose(-1, -2) @ streams

    def forward(self, x: Tensor, pos: Tensor, ctx_k: Tensor, ctx_v: Tensor, attend: AttendFn) -> Tensor:
        if x.dim() == pos.dim() + 1:  # [..., K, D]: the embedded block enters as hc_mult copies
            x = x.unsqueeze(-2).expand(*x.shape[:-1], self.hc_mult, x.shape[-1]).contiguous()
        post, comb, h = self.attn_hc(x)
        h = self.input_layernorm(h)
        attn = self.self_attn
        kv = attn.project_kv(h, pos)
        out = attend(attn.project_q(h, pos), kv, kv, ctx_k, ctx_v)
        x = self._mix(x, attn.output(out, pos), post, comb)
        post, comb, h = self.ffn_hc(x)
        return self._mix(x, self.mlp(self.post_attention_layernorm(h)), post, comb)


BACKBONES["v4"] = V4DraftLayer


@torch.no_grad()
def init_v4_weights(module: nn.Module, std: float = 0.02) -> None:
    """transformers' V4 initialisation for the modules it leaves uninitialised (torch.empty)."""
    for m in module.modules():
        if isinstance(m, hf_v4.DeepseekV4HyperConnection):
            nn.init.normal_(m.fn, std=std)
            nn.init.zeros_(m.base)
            nn.init.ones_(m.scale)
        elif isinstance(m, hf_v4.DeepseekV4HyperHead):
            nn.init.normal_(m.hc_fn, std=std)
            nn.init.zeros_(m.hc_base)
            nn.init.ones_(m.hc_scale)
        elif isinstance(m, hf_v4.DeepseekV4TopKRouter):
            nn.init.normal_(m.weight, std=std)
            m.e_score_correction_bias.zero_()
        elif isinstance(m, hf_v4.DeepseekV4Experts):
            nn.init.normal_(m.gate_up_proj, std=std)
            nn.init.normal_(m.down_proj, std=std)


class V4DSparkDrafter(DSparkDrafter):
    """DSpark (or DFlash: head none, no confidence) with V4 draft layers, mHC head and final norm.

    `backbone()` / `block_hidden()` return the pre-norm head hidden h (the hc_head output, what
    the confidence head reads); `forward` returns the post-norm hidden for the loss, and
    `target_logits(h)` applies the final norm before the frozen LM head.
    """

    def __init__(self, spec: DrafterSpec, shapes: TargetShapes):
        n = spec.num_layers
        super().__init__(replace(spec, num_layers=0), shapes)  # the V4 layers are built below, once
        self.spec = replace(self.spec, num_layers=n, num_kv_heads=1)
        self.dims = replace(self.dims, num_kv_heads=1)
        options = dict(self.spec.backbone_config)
        if shapes.num_streams > 1:
            options.setdefault("hc_mult", shapes.num_streams)
        self.v4_config = v4_config(self.dims, n, options, shapes.vocab_size)
        self.layers = nn.ModuleList(V4DraftLayer(self.dims, i, self.v4_config) for i in range(n))
        self.norm = hf_v4.DeepseekV4HyperHead(self.v4_config)  # stream collapse (DFlash calls it `norm`)
        self.final_norm = hf_v4.DeepseekV4RMSNorm(shapes.hidden_size, eps=shapes.rms_norm_eps)
        if self.confidence is not None:  # published: Linear(D + r -> 1) without bias
            self.confidence.proj = nn.Linear(self.confidence.proj.in_features, 1, bias=False)
        init_v4_weights(self)

    @property
    def dtype(self) -> torch.dtype:
        return self.final_norm.weight.dtype

    def new_state(self, batch_size: int, max_len: int, device=None) -> BlockDraftState:
        return BlockDraftState(self, batch_size, max_len, device or self.final_norm.weight.device)

    def target_logits(self, head_hidden: Tensor) -> Tensor:
        """Base logits U_k = LM_head(final_norm(h)) from the pre-norm head hidden."""
        return super().target_logits(self.final_norm(head_hidden))

    def forward(self, batch: PackedBatch) -> DraftOutput:
        head_hidden = self.backbone(batch)
        hidden = self.final_norm(head_hidden)
        prev = batch.prev_tokens_NK
        conf = self._conf(head_hidden, prev)
        if self.head is None:
            return DraftOutput(hidden_NKD=hidden, conf_logit_NK=conf)
        return DraftOutput(hidden_NKD=hidden, lowrank_NKR=self.head(prev, head_hidden),
                           lowrank_weight_RV=self.head.w2, conf_logit_NK=conf)
