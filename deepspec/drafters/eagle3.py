"""Eagle3: autoregressive one-layer drafter with training-time test (docs/algorithms.md).

Entry t of the drafter pairs the fused target feature f_t = fc([H(l1); H(l2); H(l3)]_t) with the
next token x_{t+1} and predicts x_{t+2}. The decoder layer's attention input is
[norm(embed(x)); norm(h)] (2D wide; embedding first, the layout vLLM/SGLang load), its
residual is h; logits come from the final norm through the LM head.

Training-time test (TTT), K = ttt_steps: step 0 runs on the target features; step j runs on
step j-1's output hidden with token x_{t+1+j} at RoPE position t+j. Attention of step j at
row t sees the step-0 keys of rows s <= t (causal) plus the keys of steps 1..j at row t only
(the Eagle3 "diagonal" pattern) — exactly what inference sees when it drafts j tokens past
row t. Output hidden per step is `hidden_NKD` (N = B*T rows, K steps) for the loss
(weights ttt_decay**j, soft CE against the target's distribution).

Vocabulary pruning (draft_vocab_size): keep the target tokens most frequent among the supervised
tokens of the whole training set (`count_supervised_tokens`); `d2t` offsets
(target_id = i + d2t[i]) and the `t2d` mask are buffers (saved, exported). Choice: the draft
LM head is the *frozen* slice of the target's LM head at the kept ids (docs/algorithms.md: every drafter
shares the target's LM head, frozen, never in optimizer state), not a trainable copy as
SpecForge trains; the exporter writes `lm_head` = target_lm_head[draft_to_target()] for the
engines. Without pruning the drafter uses the target's LM head as it is.

No q/k norm by default, whatever the target has: the Eagle3 layers vLLM and SGLang load are
Llama attention without per-head RMSNorm, so a drafter that copied a Qwen3 target's q/k norm
could not be served. `drafter.qk_norm=true` still builds one (refused by the export check).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
from torch import Tensor, nn

from deepspec.drafters.base import DraftOutput, Proposal, SharedTargetMixin, draw
from deepspec.drafters.dflash import layer_dims
from deepspec.drafters.layers import DraftAttention, LayerDims, RMSNorm, SwiGLU, sdpa_gqa
from deepspec.drafters.packing import Eagle3Batch
from deepspec.drafters.spec import DrafterSpec, resolve_spec
from deepspec.targets.shapes import TargetShapes


def build_vocab_map(token_counts_V: Tensor, n_keep: int) -> tuple[Tensor, Tensor]:
    """(d2t [n_keep] long offsets, t2d [V] bool) keeping the `n_keep` most frequent tokens (ties: lower id)."""
    V = token_counts_V.shape[0]
    if not 0 < n_keep <= V:
        raise ValueError(f"build_vocab_map: n_keep={n_keep} must lie in (0, {V}]")
    order = torch.sort(token_counts_V.cpu(), descending=True, stable=True).indices
    keep = order[:n_keep].sort().values
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[keep] = True
    return keep - torch.arange(n_keep), t2d


def count_tokens(ids_list: list[Tensor], vocab_size: int) -> Tensor:
    """Token frequency over training sequences (input to `build_vocab_map`)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for ids in ids_list:
        counts += torch.bincount(ids.flatten().cpu().long(), minlength=vocab_size)
    return counts


def count_supervised_tokens(source, vocab_size: int, chunk: int = 1024) -> Tensor:
    """Frequency of every supervised token of a feature source, read with `source.supervised_tokens`
    (a cache's id and mask columns, or the tokenized conversations: the target never runs)."""
    read = getattr(source, "supervised_tokens", None)
    if read is None:
        raise TypeError(f"{type(source).__name__} cannot list its supervised token ids: Eagle3's draft "
                        f"vocabulary is counted from them (use a feature cache or regenerated conversations)")
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for start in range(0, len(source), chunk):
        counts += count_tokens(read(list(range(start, min(start + chunk, len(source))))), vocab_size)
    return counts


def vocab_coverage(token_counts_V: Tensor, t2d_V: Tensor) -> float:
    """Share of the counted tokens the draft vocabulary `t2d_V` holds (any other is a forced rejection)."""
    total = int(token_counts_V.sum())
    return float(token_counts_V[t2d_V.to(token_counts_V.device)].sum()) / total if total else float("nan")


class Eagle3Layer(nn.Module):
    """The Eagle3 decoder layer: q/k/v from [input_layernorm(embed); hidden_norm(h)], residual h."""

    def __init__(self, dims: LayerDims):
        super().__init__()
        D = dims.hidden_size
        self.input_layernorm = RMSNorm(D, dims.rms_norm_eps)
        self.hidden_norm = RMSNorm(D, dims.rms_norm_eps)
        self.self_attn = DraftAttention(dims, in_dim=2 * D)
        self.post_attention_layernorm = RMSNorm(D, dims.rms_norm_eps)
        self.mlp = SwiGLU(D, dims.intermediate_size)

    def _input(self, emb: Tensor, hidden: Tensor) -> Tensor:
        return torch.cat([self.input_layernorm(emb), self.hidden_norm(hidden)], dim=-1)

    def qkv(self, emb: Tensor, hidden: Tensor, pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self._input(emb, hidden)
        return (self.self_attn.project_q(x, pos), *self.self_attn.project_kv(x, pos))

    def kv(self, emb: Tensor, hidden: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        return self.self_attn.project_kv(self._input(emb, hidden), pos)

    def finish(self, attn_out: Tensor, hidden: Tensor) -> Tensor:
        h = hidden + self.self_attn.o_proj(attn_out.flatten(-2))
        return h + self.mlp(self.post_attention_layernorm(h))


def _attend_steps(q: Tensor, ks: list[Tensor], vs: list[Tensor], mask: Tensor) -> Tensor:
    """One SDPA over keys [ks[0]; ks[1]; ...] (each [B, S_i, Hkv, hd]) with a bool mask [..., T, sum S_i].

    The TTT "diagonal" keys are ordinary keys whose mask column is true only on their own row,
    so the memory-efficient SDPA kernels apply and no [T, T] probabilities are kept per step.
    """
    k = torch.cat(ks, dim=1).transpose(1, 2)
    v = torch.cat(vs, dim=1).transpose(1, 2)
    return sdpa_gqa(q.transpose(1, 2), k, v, mask).transpose(1, 2)  # [B, T, H, hd]


class Eagle3Drafter(SharedTargetMixin, nn.Module):
    """fc (3D -> D) + one Eagle3 layer + final norm; logits through the frozen (pruned) target LM head."""

    def __init__(self, spec: DrafterSpec, shapes: TargetShapes):
        super().__init__()
        self.spec = resolve_spec(spec, shapes)
        self.shapes = shapes
        self.dims = replace(layer_dims(self.spec, shapes), qk_norm=bool(self.spec.qk_norm))  # engines: none
        D, V = shapes.hidden_size, shapes.vocab_size
        self.fc = nn.Linear(len(self.spec.layer_ids) * D, D, bias=False)
        self.midlayer = Eagle3Layer(self.dims)
        self.norm = RMSNorm(D, shapes.rms_norm_eps)
        self.pruned = self.spec.draft_vocab_size is not None
        self._draft_head: Optional[tuple[Tensor, Tensor]] = None  # (kept ids, frozen rows), built lazily
        if self.pruned:
            Vd = self.spec.draft_vocab_size
            t2d = torch.zeros(V, dtype=torch.bool)
            t2d[:Vd] = True  # placeholder map (the first Vd ids) until set_vocab_map
            self.register_buffer("d2t", torch.zeros(Vd, dtype=torch.long))
            self.register_buffer("t2d", t2d)

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    # ---- vocabulary -------------------------------------------------------------------------
    def set_vocab_map(self, d2t: Tensor, t2d: Tensor) -> None:
        """Install a `build_vocab_map` result (the draft LM head follows the new ids)."""
        if not self.pruned:
            raise ValueError("set_vocab_map: this Eagle3 drafter has no pruned vocabulary (draft_vocab_size=None)")
        if d2t.shape != self.d2t.shape or t2d.shape != self.t2d.shape:
            raise ValueError(f"set_vocab_map: got d2t {tuple(d2t.shape)}, t2d {tuple(t2d.shape)}; expected "
                             f"{tuple(self.d2t.shape)}, {tuple(self.t2d.shape)}")
        self.d2t.copy_(d2t)
        self.t2d.copy_(t2d)
        self._draft_head = None

    def draft_to_target(self) -> Tensor:
        """Target id of each draft-vocabulary entry."""
        return torch.arange(self.d2t.shape[0], device=self.d2t.device) + self.d2t

    def attach_target(self, embed_tokens, lm_head_weight: Tensor) -> None:
        super().attach_target(embed_tokens, lm_head_weight)
        self._draft_head = None

    def draft_lm_head(self) -> Tensor:
        """Frozen draft LM head [draft_vocab, D]: the target's rows at the kept ids (or all of it)."""
        w = self.frozen.lm_head_weight_VD
        if not self.pruned:
            return w
        ids = self.draft_to_target().to(w.device)
        cached = self._draft_head
        if cached is None or cached[0].shape != ids.shape or not torch.equal(cached[0], ids):
            self._draft_head = (ids, w[ids].detach())
        return self._draft_head[1]

    def draft_logits(self, hidden: Tensor) -> Tensor:
        """Logits over the draft vocabulary for post-norm hidden states."""
        w = self.draft_lm_head()
        return hidden.to(w.dtype) @ w.T

    # ---- training ---------------------------------------------------------------------------
    def forward(self, batch: Eagle3Batch) -> DraftOutput:
        ids = batch.input_ids_BT  # padding follows each row's tokens, so causal masking hides it from real rows
        B, T = ids.shape
        K = batch.labels_NK.shape[1]
        dev = ids.device
        t = torch.arange(T, device=dev)
        causal_TT = t[None, :] <= t[:, None]
        diag_TT = torch.eye(T, dtype=torch.bool, device=dev)
        hidden = self.fc(batch.taps_BTMD.flatten(-2).to(self.dtype))
        ks, vs, outs = [], [], []
        for j in range(K):
            tok = torch.zeros_like(ids)
            if 1 + j < T:
                tok[:, :T - 1 - j] = ids[:, 1 + j:]  # x_{t+1+j}
            q, k, v = self.midlayer.qkv(self.embed(tok, self.dtype), hidden, (t + j)[None].expand(B, T))
            ks.append(k)
            vs.append(v)
            mask = torch.cat([causal_TT] + [diag_TT] * j, dim=1)  # step 0 causal, steps 1..j own row only
            hidden = self.midlayer.finish(_attend_steps(q, ks, vs, mask), hidden)
            outs.append(self.norm(hidden))
        hidden_NKD = torch.stack(outs, dim=2).reshape(B * T, K, -1)
        if not self.pruned:
            return DraftOutput(hidden_NKD=hidden_NKD)
        return DraftOutput(hidden_NKD=hidden_NKD, lm_head_weight_VD=self.draft_lm_head(),
                           draft_to_target_v=self.draft_to_target())

    # ---- inference --------------------------------------------------------------------------
    def new_state(self, batch_size: int, max_len: int, device=None) -> Eagle3State:
        return Eagle3State(self, batch_size, max_len, device or self.norm.weight.device)

    @torch.no_grad()
    def propose(self, state: Eagle3State, anchor_tokens_B: Tensor, anchor_pos_B: Tensor, greedy: bool = True,
                temperature: float = 1.0, generator: Optional[torch.Generator] = None,
                forced_tokens_BK: Optional[Tensor] = None, num_tokens: Optional[int] = None) -> Proposal:
        """Draft `num_tokens` (default block_size) tokens autoregressively after each anchor.

        The anchor (position lengths_B) pairs with the last target feature held in the state.
        """
        K = num_tokens or self.spec.block_size
        B = anchor_tokens_B.shape[0]
        L_B = state.lengths_B
        if bool((anchor_pos_B.to(L_B.device) != L_B).any()) or bool((L_B < 1).any()):
            raise ValueError(f"Eagle3 propose: anchor_pos_B {anchor_pos_B.tolist()} must equal the number of "
                             f"target features held {L_B.tolist()} (>= 1); extend or crop the state first")
        dev = anchor_tokens_B.device
        S = max(int(L_B.max()) - 1, 1)
        ctx_ok = (torch.arange(S, device=dev)[None, :] < (L_B - 1)[:, None])[:, None, :]  # cached entries
        b = torch.arange(B, device=dev)
        hidden = state.feats[b, L_B - 1][:, None]  # [B, 1, D]
        tok = anchor_tokens_B
        k_ctx, v_ctx = state.k_cache[:, :S], state.v_cache[:, :S]
        step_k, step_v, tokens, probs = [], [], [], []
        for j in range(K):
            pos = (L_B - 1 + j)[:, None]
            q, k, v = self.midlayer.qkv(self.embed(tok[:, None], self.dtype), hidden, pos)
            step_k.append(k)
            step_v.append(v)
            mask = torch.cat([ctx_ok, ctx_ok.new_ones(B, 1, j + 1)], dim=-1)
            out = _attend_steps(q, [k_ctx, *step_k], [v_ctx, *step_v], mask)
            hidden = self.midlayer.finish(out, hidden)
            logits = self.draft_logits(self.norm(hidden))[:, 0]
            forced = None
            if forced_tokens_BK is not None:
                forced = forced_tokens_BK[:, j]
                if self.pruned:  # forced target ids -> draft ids
                    forced = torch.cumsum(self.t2d.long(), 0)[forced] - 1
            d_tok, p = draw(logits, greedy, temperature, generator, forced)
            tok = self.draft_to_target()[d_tok] if self.pruned else d_tok
            if self.pruned:
                full = p.new_zeros(B, self.shapes.vocab_size)
                full[:, self.draft_to_target()] = p
                p = full
            tokens.append(tok)
            probs.append(p)
        return Proposal(tokens_BK=torch.stack(tokens, 1), draft_probs_BKV=torch.stack(probs, 1))


class Eagle3State:
    """Eagle3 draft KV cache: entry t = (f_t, x_{t+1}) for t < lengths_B - 1, plus every fused feature.

    The last feature is pending: it pairs with the next anchor in `propose` (and is committed
    by the next `extend`, whose first token is that anchor).
    """

    def __init__(self, drafter: Eagle3Drafter, batch_size: int, max_len: int, device):
        d = drafter.dims
        self.drafter, self.max_len = drafter, max_len
        self.k_cache = torch.zeros(batch_size, max_len, d.num_kv_heads, d.head_dim, device=device,
                                   dtype=drafter.dtype)
        self.v_cache = torch.zeros_like(self.k_cache)
        self.feats = torch.zeros(batch_size, max_len, d.hidden_size, device=device, dtype=drafter.dtype)
        self.lengths_B = torch.zeros(batch_size, dtype=torch.long, device=device)

    @torch.no_grad()
    def extend(self, taps_BTMD: Tensor, lengths_B: Tensor, tokens_BT: Optional[Tensor] = None) -> None:
        """Append the first lengths_B[b] rows: target features and the tokens at the same positions."""
        if tokens_BT is None:
            raise ValueError("Eagle3 extend needs tokens_BT (the tokens the target read at these positions)")
        B, T = taps_BTMD.shape[:2]
        lengths_B = lengths_B.to(self.lengths_B.device)
        if bool((self.lengths_B + lengths_B > self.max_len).any()):
            raise ValueError(f"extend: state holds at most {self.max_len} tokens per request; lengths "
                             f"{self.lengths_B.tolist()} + {lengths_B.tolist()} exceed it (make a larger state)")
        dr = self.drafter
        t = torch.arange(T, device=self.lengths_B.device)
        pos = self.lengths_B[:, None] + t
        b_idx, t_idx = (t[None, :] < lengths_B[:, None]).nonzero(as_tuple=True)
        p = pos[b_idx, t_idx]
        self.feats[b_idx, p] = dr.fc(taps_BTMD[b_idx, t_idx].flatten(-2).to(dr.dtype))
        pair = p >= 1  # token at position p closes entry p-1 = (f_{p-1}, x_p)
        b_e, e = b_idx[pair], p[pair] - 1
        emb = dr.embed(tokens_BT[b_idx[pair], t_idx[pair]].to(taps_BTMD.device), dr.dtype)
        k, v = dr.midlayer.kv(emb, self.feats[b_e, e], e)
        self.k_cache[b_e, e] = k.to(self.k_cache.dtype)
        self.v_cache[b_e, e] = v.to(self.v_cache.dtype)
        self.lengths_B = self.lengths_B + lengths_B

    def crop(self, lengths_B: Tensor) -> None:
        """Keep only the first lengths_B[b] target features of each request (roll back)."""
        self.lengths_B = torch.minimum(self.lengths_B, lengths_B.to(self.lengths_B.device))
