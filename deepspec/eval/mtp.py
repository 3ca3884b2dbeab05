"""A DeepSeek-V4 target's own MTP module as a one-token drafter: the `mtp` baseline (MTP-1).

V4 checkpoints carry a multi-token-prediction module (`mtp.0.*`, one V4 decoder block). At a
position j it reads the target's last-layer residual streams H_{j-1} [hc, D] (before the stream
collapse and the final norm) and the token t_j, and predicts t_{j+1}:

    x_j = e_proj(enorm(embed(t_j))) + h_proj(hnorm(H_{j-1}))       (broadcast over the hc streams)
    y_j = V4 block(x_j)   sliding-window attention over the x of earlier positions, with the
                          per-head attention sink; routed + shared experts; mHC mixing
    logits_j = LM head(norm(hc_head(y_j)))                          (its own hc_head and norm)

As a drafter, the anchor x0 at position p (the token the target just produced) and H_{p-1} give
one draft per round: that is how DeepSeek reports "MTP-1". The embedding and LM head are the
target's. H comes from a forward hook on the target's last decoder layer (deepspec's taps are
stream-collapsed; the module reads the streams themselves).

Weights: the `mtp.0.*` tensors of a V4 checkpoint directory (FP8 / FP4 dequantised); a random
`random:deepseek_v4` test target "carries" a random MTP module when its config has
num_nextn_predict_layers >= 1 (transformers' default), initialised from the target's seed.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf_v4

from deepspec.drafters.base import Proposal, draw
from deepspec.drafters.layers import LayerDims
from deepspec.drafters.spec import DrafterSpec
from deepspec.drafters.v4 import V4DraftLayer, init_v4_weights
from deepspec.export.v4 import LAYER_NAMES
from deepspec.targets.frozen import FrozenTarget

MTP_KEYS = ("e_proj.weight", "h_proj.weight", "enorm.weight", "hnorm.weight", "norm.weight")


class V4MTPDrafter(nn.Module):
    """V4's MTP module over a loaded V4 target; engine interface of a one-token autoregressive drafter."""

    def __init__(self, target: FrozenTarget):
        super().__init__()
        config = target.model.config
        if getattr(config, "model_type", None) != "deepseek_v4":
            raise ValueError(f"eval.baselines=[mtp] runs a DeepSeek-V4 target's MTP module; target {target.name} "
                             f"is {getattr(config, 'model_type', '?')}")
        cfg = copy.deepcopy(config)
        cfg.num_hidden_layers, cfg.layer_types, cfg.mlp_layer_types = 1, ["sliding_attention"], ["moe"]
        cfg._experts_implementation = "eager"
        self.cfg, self.window = cfg, int(cfg.sliding_window)
        D, eps = cfg.hidden_size, cfg.rms_norm_eps
        dims = LayerDims(hidden_size=D, num_heads=cfg.num_attention_heads, num_kv_heads=1, head_dim=cfg.head_dim,
                         intermediate_size=cfg.moe_intermediate_size, rms_norm_eps=eps,
                         sliding_window=self.window)
        self.enorm, self.hnorm = hf_v4.DeepseekV4RMSNorm(D, eps=eps), hf_v4.DeepseekV4RMSNorm(D, eps=eps)
        self.e_proj, self.h_proj = nn.Linear(D, D, bias=False), nn.Linear(D, D, bias=False)
        self.block = V4DraftLayer(dims, 0, cfg)
        self.sinks = nn.Parameter(torch.zeros(cfg.num_attention_heads))
        self.hc_head = hf_v4.DeepseekV4HyperHead(cfg)
        self.norm = hf_v4.DeepseekV4RMSNorm(D, eps=eps)
        L = target.num_layers
        # one draft per round; `eagle3` is the registry's autoregressive family (drafts any number of tokens)
        self.spec = DrafterSpec(kind="eagle3", num_layers=1, block_size=1, layer_ids=[L - 1])
        object.__setattr__(self, "_target", target)  # not a submodule: its weights are the target's
        self._streams: Tensor | None = None
        self._hook = target._layers[L - 1].register_forward_hook(self._capture)

    def _capture(self, _module, _args, output) -> None:
        self._streams = output[0] if isinstance(output, (tuple, list)) else output

    def close(self) -> None:
        """Remove the hook on the target's last layer."""
        self._hook.remove()

    @property
    def dtype(self) -> torch.dtype:
        return self.e_proj.weight.dtype

    def new_state(self, batch_size: int, max_len: int, device=None) -> MTPState:
        return MTPState(self, batch_size, max_len, device or self.e_proj.weight.device)

    def mtp_input(self, streams_NHD: Tensor, tokens_N: Tensor) -> Tensor:
        """x = e_proj(enorm(embed(t))) + h_proj(hnorm(H)) per stream: [N, hc, D]."""
        emb = self._target.embed_tokens(tokens_N).to(self.dtype)
        return self.e_proj(self.enorm(emb))[:, None] + self.h_proj(self.hnorm(streams_NHD.to(self.dtype)))

    def context_kv(self, x_NHD: Tensor, pos_N: Tensor) -> Tensor:
        """The block's K = V [N, hd] for MTP inputs at earlier positions (what later queries attend to)."""
        _, _, h = self.block.attn_hc(x_NHD[:, None])
        return self.block.self_attn.project_kv(self.block.input_layernorm(h), pos_N[:, None])[:, 0, 0]

    @torch.no_grad()
    def propose(self, state: MTPState, anchor_tokens_B: Tensor, anchor_pos_B: Tensor, greedy: bool = True,
                temperature: float = 1.0, generator: torch.Generator | None = None, num_tokens: int = 1,
                with_probs: bool = True, **_) -> Proposal:
        if num_tokens != 1:
            raise ValueError(f"the MTP baseline drafts one token per round (MTP-1); asked for {num_tokens}")
        x = self.mtp_input(state.last_streams_BHD, anchor_tokens_B)[:, None]  # [B, 1, hc, D]
        pos = anchor_pos_B[:, None]
        keys = torch.arange(state.max_len, device=pos.device)
        visible = (keys[None] < state.lengths_B[:, None]) & (pos - keys[None] < self.window)  # [B, C]

        def attend(q, k_blk, v_blk, ctx_k, ctx_v):  # q [B, 1, H, hd]; ctx [B, C, hd]; with the sink
            scale = q.shape[-1] ** -0.5
            ctx = torch.einsum("bqhd,bcd->bhqc", q.float(), ctx_k.float()) * scale
            ctx = ctx.masked_fill(~visible[:, None, None], float("-inf"))
            own = torch.einsum("bqhd,bqd->bhq", q.float(), k_blk[:, :, 0].float())[..., None] * scale
            sink = self.sinks.float()[None, :, None, None].expand(*own.shape)
            probs = torch.cat([ctx, own, sink], dim=-1).softmax(-1)
            out = probs[..., :-2] @ ctx_v.float()[:, None] + probs[..., -2:-1] * v_blk[:, :, 0].float()[:, None]
            return out.transpose(1, 2).to(q.dtype)  # [B, 1, H, hd]

        y = self.block(x, pos, state.kv_BCD, state.kv_BCD, attend)  # [B, 1, hc, D]
        logits = self._target.logits(self.norm(self.hc_head(y))[:, 0].to(self._target.dtype))
        tokens, probs = draw(logits, greedy, temperature, generator, None, with_probs)
        return Proposal(tokens_BK=tokens[:, None], draft_probs_BKV=None if probs is None else probs[:, None])


class MTPState:
    """Per request: K = V of the MTP block at every committed position >= 1, and H of the last one."""

    def __init__(self, drafter: V4MTPDrafter, batch_size: int, max_len: int, device):
        cfg = drafter.cfg
        self.drafter, self.max_len = drafter, max_len
        self.kv_BCD = torch.zeros(batch_size, max_len, cfg.head_dim, device=device, dtype=drafter.dtype)
        self.last_streams_BHD = torch.zeros(batch_size, cfg.hc_mult, cfg.hidden_size, device=device,
                                            dtype=drafter.dtype)
        self.lengths_B = torch.zeros(batch_size, dtype=torch.long, device=device)  # positions held

    @torch.no_grad()
    def extend(self, taps_BTMD: Tensor, lengths_B: Tensor, tokens_BT: Tensor | None = None) -> None:
        """Commit the first lengths_B[b] positions of the target's last forward (streams from the hook)."""
        if tokens_BT is None:
            raise ValueError("MTP extend needs tokens_BT (the tokens the target read at these positions)")
        streams = self.drafter._streams  # [B, T', hc, D] of the last target forward
        if streams is None:
            raise RuntimeError("MTP baseline: no target forward seen; the hook on its last layer did not fire")
        lengths_B = lengths_B.to(self.lengths_B.device)
        B, T = tokens_BT.shape
        if bool((self.lengths_B == 0).all()) and streams.shape[1] >= T:  # the prefill: rows were left-padded
            pad_B = streams.shape[1] - lengths_B
            index = (torch.arange(T, device=pad_B.device)[None] + pad_B[:, None]).clamp_max(streams.shape[1] - 1)
            streams = streams.gather(1, index[:, :, None, None].expand(-1, -1, *streams.shape[2:]))
        for b in range(B):
            n = int(lengths_B[b])
            if n == 0:
                continue
            start = int(self.lengths_B[b])
            prev = torch.cat([self.last_streams_BHD[b:b + 1], streams[b, :n - 1].to(self.kv_BCD.dtype)])
            pos = torch.arange(start, start + n, device=self.kv_BCD.device)
            first = 1 if start == 0 else 0  # position 0 has no H_{-1}: the module starts at position 1
            if n > first:
                x = self.drafter.mtp_input(prev[first:], tokens_BT[b, first:n])
                self.kv_BCD[b, start + first:start + n] = self.drafter.context_kv(x, pos[first:]).to(self.kv_BCD.dtype)
            self.last_streams_BHD[b] = streams[b, n - 1]
        self.lengths_B = self.lengths_B + lengths_B


def load_mtp_drafter(target: FrozenTarget) -> V4MTPDrafter:
    """The target's MTP module (checkpoint tensors, or seeded random ones for a random test target)."""
    drafter = V4MTPDrafter(target)
    source = target.source or ""
    if source.startswith("random:"):
        if int(getattr(target.model.config, "num_nextn_predict_layers", 0) or 0) < 1:
            raise ValueError(f"eval.baselines=[mtp]: the random target {target.name} is configured without an MTP "
                             f"module (num_nextn_predict_layers=0)")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(getattr(target, "seed", 0) or 0) + 1)
            init_v4_weights(drafter)
            for lin in (drafter.e_proj, drafter.h_proj):
                nn.init.normal_(lin.weight, std=target.model.config.initializer_range)
    else:
        _load_checkpoint_mtp(drafter, Path(source), target.name)
    return drafter.to(target.device, target.dtype).eval()


def _load_checkpoint_mtp(drafter: V4MTPDrafter, src: Path, name: str) -> None:
    from deepspec.export.v4 import read_mtp_tensors

    if not src.is_dir():
        raise ValueError(f"eval.baselines=[mtp]: the MTP module is read from the target's checkpoint directory; "
                         f"target {name} was loaded from {src or '?'} (not a directory with mtp.* tensors)")
    state = {k.removeprefix("mtp.0."): v for k, v in read_mtp_tensors(src).items() if k.startswith("mtp.0.")}
    missing = [k for k in MTP_KEYS if k not in state]
    if missing:
        raise ValueError(f"eval.baselines=[mtp]: {src} has no V4 MTP module (missing mtp.0.{', mtp.0.'.join(missing)}"
                         f"); a checkpoint whose mtp.* holds a DSpark drafter is evaluated with `deepspec import` "
                         f"and eval.baselines=[CHECKPOINT] instead")
    sd = {"enorm.weight": state["enorm.weight"], "hnorm.weight": state["hnorm.weight"],
          "e_proj.weight": state["e_proj.weight"], "h_proj.weight": state["h_proj.weight"],
          "norm.weight": state["norm.weight"], "hc_head.hc_fn": state["hc_head_fn"],
          "hc_head.hc_base": state["hc_head_base"], "hc_head.hc_scale": state["hc_head_scale"],
          "sinks": state.get("attn.attn_sink", torch.zeros_like(drafter.sinks))}
    for ours, theirs in LAYER_NAMES.items():
        sd["block." + ours] = state[theirs]
    E = drafter.cfg.n_routed_experts
    sd["block.mlp.experts.gate_up_proj"] = torch.stack(
        [torch.cat([state[f"ffn.experts.{e}.w1.weight"], state[f"ffn.experts.{e}.w3.weight"]]) for e in range(E)])
    sd["block.mlp.experts.down_proj"] = torch.stack([state[f"ffn.experts.{e}.w2.weight"] for e in range(E)])
    own = drafter.state_dict()
    drafter.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)


