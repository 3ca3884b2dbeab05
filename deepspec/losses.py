"""Distillation losses for draft models, chunked over the vocabulary (docs/training.md, docs/algorithms.md).

Drafters hand us hidden states, never logits: the frozen LM head is applied here,
one vocabulary chunk at a time, inside custom autograd functions, so that an
[N, V] logits tensor never exists, in forward or backward. At most a few
[N, chunk] blocks live at once (logits, probabilities, their difference).

- `distill_losses`: DSpark / DFlash objective. Draft logits z = h W^T (+ L W2 for
  the sequential head's low-rank bias B_k), target logits from the target's final
  hidden state through the same frozen head. Returns weighted *sums* of CE, TV
  (||p_d - p_t||_1) and confidence BCE; the trainer divides by the global weight
  sum across ranks.
- `eagle_soft_ce`: Eagle3 soft cross-entropy against the target distribution
  restricted to the (possibly pruned) draft vocabulary and renormalised.
- `position_weights`, `block_tau`, `simulated_tau`: w_k and the training-time
  acceptance-length estimate 1 + sum_k prod_{i<=k} (1 - TV_i).

How the chunked functions work: forward pass 1 computes the log-sum-exp of draft
and target logits chunk by chunk (plus the label logit and the running argmax);
pass 2 recomputes each chunk and accumulates ||p_d - p_t||_1 and
S = sum_v sign(p_d - p_t)_v p_d(v). Backward recomputes each chunk's logits and
forms the analytic gradient grad_z = g_ce (p_d - onehot) + g_tv p_d (s - S), then
accumulates grad_h += grad_z W_c, grad_L += grad_z W2_c^T, grad_W2_c = L^T grad_z.
With `keep_probs_mb` large enough (CPU), pass 1 keeps its logits, pass 2 turns them into
probabilities in place, and backward reads those: no logits are recomputed.
Softmax arithmetic and every accumulation run in float32 (float64 stays float64)
even for bf16 inputs. The elementwise work on each chunk lives in three small
functions that `compile_chunks=True` hands to torch.compile: on CUDA that work, not
the matmuls, dominates, and fusing it makes the chunked loss faster than the naive
one (benchmarks/chunked_loss.py). The LM head weights and the target hidden states are frozen:
passing an LM head that requires grad raises.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

_HALF = (torch.bfloat16, torch.float16)


@dataclass
class DistillLossOutput:
    """Sums over supervised positions, NOT normalised (divide by the global weight sum)."""

    loss_sum: Tensor  # alpha_ce*ce_sum + alpha_tv*tv_sum + alpha_conf*conf_sum, differentiable
    ce_sum: Tensor  # detached
    tv_sum: Tensor  # detached
    conf_sum: Tensor  # detached
    weight_sum: Tensor  # sum of w_k over supervised positions, detached
    accept_NK: Tensor  # 1 - 0.5*||p_d - p_t||_1, detached, 0 where invalid
    correct_NK: Tensor  # argmax(p_d) == label, False where invalid
    valid_NK: Tensor


# --------------------------------------------------------------------------- helpers


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


_CPU_HALF_PRODUCTS = [False]  # set by `cpu_half_products`


@contextlib.contextmanager
def cpu_half_products(enabled: bool = True):
    """Inside: on a CPU, products with a half-precision input run in that precision (~4x faster
    with AVX512-BF16/AMX; the result is rounded to it before the fp32 softmax statistics).
    Outside (default), half-precision inputs are upcast and accumulate exactly in fp32. The
    setting in force at a loss's forward is also used by its backward. Mixed-precision
    training (`trainer.precision=amp`) enters it around the loss."""
    old = _CPU_HALF_PRODUCTS[0]
    _CPU_HALF_PRODUCTS[0] = enabled
    try:
        yield
    finally:
        _CPU_HALF_PRODUCTS[0] = old


def _mm(a: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
    """a @ b with the result in `acc`. bf16/fp16 on CUDA: half-precision inputs with an
    fp32 output (no bf16 rounding of logits); on a CPU see `cpu_half_products`; elsewhere
    the inputs are upcast."""
    half = a.dtype if a.dtype in _HALF else b.dtype if b.dtype in _HALF else None
    if _CPU_HALF_PRODUCTS[0] and half is not None and not a.is_cuda and acc == torch.float32:
        return (a.to(half) @ b.to(half)).to(acc)
    if a.is_cuda and a.dtype in _HALF and b.dtype == a.dtype and acc == torch.float32:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            return (a @ b).to(acc)
    return a.to(acc) @ b.to(acc)


def _logits(h_MD: Tensor, w_cD: Tensor, acc: torch.dtype,
            low_MR: Tensor | None = None, w2_Rc: Tensor | None = None) -> Tensor:
    """One [M, c] block of logits h W_c^T (+ L W2_c) in the accumulation dtype."""
    z = _mm(h_MD, w_cD.to(h_MD.dtype).t(), acc)
    if low_MR is not None:
        z += _mm(low_MR, w2_Rc.to(low_MR.dtype), acc)
    return z


def _chunks(V: int, chunk_size: int):
    return [(c0, min(c0 + chunk_size, V)) for c0 in range(0, V, chunk_size)]


def _update_argmax(best: tuple[Tensor, Tensor], max_M: Tensor, arg_M: Tensor,
                   c0: int) -> tuple[Tensor, Tensor]:
    """Running (max, argmax) over chunks; strict > so ties go to the earlier chunk, like
    torch.argmax."""
    better = max_M > best[0]
    return torch.where(better, max_M, best[0]), torch.where(better, arg_M + c0, best[1])


def _no_argmax(M: int, acc: torch.dtype, device) -> tuple[Tensor, Tensor]:
    return (torch.full((M,), float("-inf"), dtype=acc, device=device),
            torch.zeros(M, dtype=torch.long, device=device))


def _check_frozen(name: str, weight: Tensor) -> None:
    if torch.is_grad_enabled() and weight.requires_grad:
        raise ValueError(
            f"{name} requires grad, but the LM head is frozen in deepspec (docs/algorithms.md) and these "
            f"chunked losses return no gradient for it; pass {name}.detach() or freeze it "
            "with .requires_grad_(False)."
        )


def _check_shape(name: str, t: Tensor | None, shape: tuple) -> None:
    if t is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}.")


# ------------------------------------------------------------ DSpark / DFlash losses


def _stats_block(z_Mc, t_Mc, col_M, here_M):
    """Pass 1 on one chunk: draft and target log-sum-exp, label logit, draft max/argmax."""
    max_M, arg_M = z_Mc.max(dim=1)
    lse_d = max_M + (z_Mc - max_M[:, None]).exp_().sum(dim=1).log_()
    lse_t = torch.logsumexp(t_Mc, dim=1)
    label = torch.where(here_M, z_Mc.gather(1, col_M[:, None])[:, 0], 0.0)
    return lse_d, lse_t, label, max_M, arg_M


def _tv_block(z_Mc, t_Mc, lse_d, lse_t):
    """Pass 2 on one chunk: ||p_d - p_t||_1 and S = sum_v sign(p_d - p_t)_v p_d(v).
    (In-place on intermediates and `del` of the inputs keep eager mode at ~3 blocks.)"""
    p = (z_Mc - lse_d[:, None]).exp_()
    del z_Mc
    diff = (t_Mc - lse_t[:, None]).exp_()
    del t_Mc
    diff = diff.neg_().add_(p)
    return diff.abs().sum(dim=1), diff.sign_().mul_(p).sum(dim=1)


def _grad_block(z_Mc, t_Mc, lse_d, lse_t, s_dot_p, g_ce, g_tv, col_M, here_M,
                out_dtype: torch.dtype):
    """d(sum g_ce*ce + g_tv*tv)/dz on one chunk: g_ce (p - onehot) + g_tv p (s - S)."""
    p = (z_Mc - lse_d[:, None]).exp_()
    del z_Mc
    if g_tv is None:
        g_z = p.mul_(g_ce[:, None])
    else:
        g_z = (t_Mc - lse_t[:, None]).exp_()
        del t_Mc
        g_z = g_z.neg_().add_(p).sign_().sub_(s_dot_p[:, None]).mul_(p).mul_(g_tv[:, None])
        if g_ce is not None:
            g_z.addcmul_(p, g_ce[:, None])
    if g_ce is not None:  # the one-hot part of p - onehot
        g_z.scatter_add_(1, col_M[:, None], torch.where(here_M, -g_ce, 0.0)[:, None])
    return g_z.to(out_dtype)


def _grad_kept(p_Mc, q_Mc, s_dot_p, g_ce, g_tv, col_M, here_M, out_dtype: torch.dtype):
    """`_grad_block` from probabilities kept since the forward (p_d, p_t are read, not changed)."""
    if g_tv is None:
        g_z = p_Mc * g_ce[:, None]
    else:
        g_z = (p_Mc - q_Mc).sign_().sub_(s_dot_p[:, None]).mul_(p_Mc).mul_(g_tv[:, None])
        if g_ce is not None:
            g_z.addcmul_(p_Mc, g_ce[:, None])
    if g_ce is not None:
        g_z.scatter_add_(1, col_M[:, None], torch.where(here_M, -g_ce, 0.0)[:, None])
    return g_z.to(out_dtype)


_COMPILED: dict = {}


def _block_fns(compiled: bool):
    """The three per-chunk bodies, eager or through torch.compile (which fuses their
    ~15 elementwise passes over each [M, chunk] block into a few kernels)."""
    if not compiled:
        return _stats_block, _tv_block, _grad_block
    if not _COMPILED:
        _COMPILED.update(stats=torch.compile(_stats_block, dynamic=False),
                         tv=torch.compile(_tv_block, dynamic=False),
                         grad=torch.compile(_grad_block, dynamic=False))
    return _COMPILED["stats"], _COMPILED["tv"], _COMPILED["grad"]


class _ChunkedCETV(torch.autograd.Function):
    """Per-row CE and ||p_d - p_t||_1 over M rows, chunked over V; also the draft argmax."""

    @staticmethod
    def forward(ctx, h_MD, w_VD, th_MD, labels_M, low_MR, w2_RV, chunk_size, compiled, keep_bytes):
        ctx.half_products = _CPU_HALF_PRODUCTS[0]
        M, V = h_MD.shape[0], w_VD.shape[0]
        acc = _acc_dtype(h_MD.dtype)
        chunks = _chunks(V, chunk_size)
        stats_fn, tv_fn, _ = _block_fns(compiled)
        # Keep mode: when draft and target probabilities of all M rows fit in keep_bytes, the
        # logits of pass 1 are kept, turned into probabilities in place in pass 2 and reused
        # by backward: 2 logit matmuls per step instead of 6 (CPU training, small M).
        keep = 0 < 2 * M * V * torch.finfo(acc).bits // 8 <= keep_bytes
        kept_z, kept_t = [], []
        lse_d_parts, lse_t_parts = [], []
        label_logit = h_MD.new_zeros(M, dtype=acc)
        best = _no_argmax(M, acc, h_MD.device)
        for c0, c1 in chunks:  # pass 1: normalisers, label logit, argmax
            w2 = None if w2_RV is None else w2_RV[:, c0:c1]
            here = (labels_M >= c0) & (labels_M < c1)
            col = (labels_M - c0).clamp(0, c1 - c0 - 1)
            z_Mc, t_Mc = _logits(h_MD, w_VD[c0:c1], acc, low_MR, w2), _logits(th_MD, w_VD[c0:c1], acc)
            lse_d_c, lse_t_c, label_c, max_c, arg_c = stats_fn(z_Mc, t_Mc, col, here)
            if keep:
                kept_z.append(z_Mc)
                kept_t.append(t_Mc)
            del z_Mc, t_Mc
            lse_d_parts.append(lse_d_c)
            lse_t_parts.append(lse_t_c)
            label_logit += label_c
            best = _update_argmax(best, max_c, arg_c, c0)
        lse_d = torch.logsumexp(torch.stack(lse_d_parts, 1), dim=1)
        lse_t = torch.logsumexp(torch.stack(lse_t_parts, 1), dim=1)
        ce = lse_d - label_logit
        tv = torch.zeros_like(lse_d)
        s_dot_p = torch.zeros_like(lse_d)  # S = sum_v sign(p_d - p_t)_v p_d(v)
        for j, (c0, c1) in enumerate(chunks):  # pass 2: TV and S
            if keep:
                p_Mc = kept_z[j].sub_(lse_d[:, None]).exp_()  # the kept logits become probabilities
                q_Mc = kept_t[j].sub_(lse_t[:, None]).exp_()
                diff = p_Mc - q_Mc
                tv_c, s_c = diff.abs().sum(dim=1), diff.sign_().mul_(p_Mc).sum(dim=1)
                del diff
            else:
                w2 = None if w2_RV is None else w2_RV[:, c0:c1]
                tv_c, s_c = tv_fn(_logits(h_MD, w_VD[c0:c1], acc, low_MR, w2),
                                  _logits(th_MD, w_VD[c0:c1], acc), lse_d, lse_t)
            tv += tv_c
            s_dot_p += s_c
        ctx.save_for_backward(h_MD, w_VD, th_MD, labels_M, low_MR, w2_RV, lse_d, lse_t, s_dot_p)
        ctx.chunk_size, ctx.compiled = chunk_size, compiled
        ctx.kept = (kept_z, kept_t) if keep else None
        ctx.mark_non_differentiable(best[1])
        ctx.set_materialize_grads(False)
        return ce, tv, best[1]

    @staticmethod
    def backward(ctx, g_ce, g_tv, _g_idx):
        with cpu_half_products(ctx.half_products):
            return _ChunkedCETV._backward(ctx, g_ce, g_tv)

    @staticmethod
    def _backward(ctx, g_ce, g_tv):
        h_MD, w_VD, th_MD, labels_M, low_MR, w2_RV, lse_d, lse_t, s_dot_p = ctx.saved_tensors
        need_h, _, _, _, need_low, need_w2 = ctx.needs_input_grad[:6]
        if g_ce is None and g_tv is None:
            return (None,) * 9
        acc = lse_d.dtype
        g_ce = None if g_ce is None else g_ce.to(acc)
        g_tv = None if g_tv is None else g_tv.to(acc)
        grad_fn = _block_fns(ctx.compiled)[2]
        grad_h = torch.zeros(h_MD.shape, dtype=acc, device=h_MD.device) if need_h else None
        grad_low = torch.zeros(low_MR.shape, dtype=acc, device=h_MD.device) if need_low else None
        grad_w2 = torch.zeros_like(w2_RV) if need_w2 else None
        for j, (c0, c1) in enumerate(_chunks(w_VD.shape[0], ctx.chunk_size)):
            w_cD = w_VD[c0:c1]
            w2 = None if w2_RV is None else w2_RV[:, c0:c1]
            here = (labels_M >= c0) & (labels_M < c1)
            col = (labels_M - c0).clamp(0, c1 - c0 - 1)
            if ctx.kept is not None:
                g_z = _grad_kept(ctx.kept[0][j], ctx.kept[1][j], s_dot_p, g_ce, g_tv, col, here, h_MD.dtype)
            else:
                t = None if g_tv is None else _logits(th_MD, w_cD, acc)  # TV needs the target
                g_z = grad_fn(_logits(h_MD, w_cD, acc, low_MR, w2), t, lse_d, lse_t, s_dot_p,
                              g_ce, g_tv, col, here, h_MD.dtype)
            if need_h:
                grad_h += _mm(g_z, w_cD.to(h_MD.dtype), acc)
            if need_low:
                g_z = g_z.to(low_MR.dtype)
                grad_low += _mm(g_z, w2.to(low_MR.dtype).t(), acc)
            if need_w2:
                grad_w2[:, c0:c1] = _mm(low_MR.t(), g_z.to(low_MR.dtype), acc).to(w2_RV.dtype)
        return (
            None if grad_h is None else grad_h.to(h_MD.dtype),
            None, None, None,
            None if grad_low is None else grad_low.to(low_MR.dtype),
            grad_w2, None, None, None,
        )


def position_weights(block_size: int, gamma_w: float | None) -> Tensor:
    """w_k = exp(-(k-1)/gamma_w) for k = 1..block_size; gamma_w None means block_size
    (the paper's text; the reference trainer and `loss.gamma_w`'s default use 4.0). Returns float32
    [block_size]."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}.")
    gamma = float(block_size if gamma_w is None else gamma_w)
    if gamma <= 0:
        raise ValueError(f"gamma_w must be positive (or None for block_size), got {gamma_w}.")
    return torch.exp(-torch.arange(block_size, dtype=torch.float32) / gamma)


def distill_losses(
    hidden_NKD: Tensor,
    lm_weight_VD: Tensor,
    target_hidden_NKD: Tensor,
    labels_NK: Tensor,
    valid_NK: Tensor,
    weights_K: Tensor,
    lowrank_NKR: Tensor | None = None,
    lowrank_weight_RV: Tensor | None = None,
    conf_logit_NK: Tensor | None = None,
    alpha_ce: float = 0.1,
    alpha_tv: float = 0.9,
    alpha_conf: float = 1.0,
    chunk_size: int = 16384,
    compile_chunks: bool = False,
    keep_probs_mb: float = 0.0,
) -> DistillLossOutput:
    """DSpark/DFlash loss sums over N blocks of K positions (docs/training.md).

    hidden_NKD: drafter's final hidden (gets grad). lm_weight_VD: frozen LM head.
    target_hidden_NKD: target's final hidden after its final norm (no grad).
    labels_NK: the target's tokens x*. valid_NK: supervised positions (bool).
    weights_K: w_k. lowrank_NKR @ lowrank_weight_RV: the sequential head's bias B_k
    (both get grad). conf_logit_NK: confidence head logits (gets grad); None means no
    confidence term. Terms with a zero alpha add no work to backward; CE, TV and the
    acceptance metrics are always computed for logging. Invalid positions cost nothing:
    only valid rows are gathered and sent through the LM head. compile_chunks=True runs
    the per-chunk elementwise work through torch.compile (worth it on CUDA, where that
    work, not the matmuls, dominates; the first call compiles). keep_probs_mb > 0: when the
    draft and target probabilities of all valid rows fit in that many MiB (2*M*V*4 bytes),
    they are kept from the forward for backward instead of recomputed (same values; about
    2x faster on CPU, where memory is plentiful and the matmuls dominate).
    """
    N, K, D = hidden_NKD.shape
    V = lm_weight_VD.shape[0]
    _check_shape("target_hidden_NKD", target_hidden_NKD, (N, K, D))
    _check_shape("labels_NK", labels_NK, (N, K))
    _check_shape("valid_NK", valid_NK, (N, K))
    _check_shape("weights_K", weights_K, (K,))
    _check_shape("lm_weight_VD", lm_weight_VD, (V, D))
    _check_shape("conf_logit_NK", conf_logit_NK, (N, K))
    if (lowrank_NKR is None) != (lowrank_weight_RV is None):
        raise ValueError("lowrank_NKR and lowrank_weight_RV must be given together (or neither).")
    if lowrank_NKR is not None:
        R = lowrank_NKR.shape[-1]
        _check_shape("lowrank_NKR", lowrank_NKR, (N, K, R))
        _check_shape("lowrank_weight_RV", lowrank_weight_RV, (R, V))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    _check_frozen("lm_weight_VD", lm_weight_VD)

    valid_NK = valid_NK.bool()
    idx_M = valid_NK.reshape(-1).nonzero()[:, 0]
    labels_M = labels_NK.reshape(-1)[idx_M].long()
    if labels_M.numel() and (labels_M.min() < 0 or labels_M.max() >= V):
        raise ValueError(
            f"labels_NK has values in [{int(labels_M.min())}, {int(labels_M.max())}] at valid "
            f"positions; they must lie in [0, {V}) (mark padding with valid_NK=False)."
        )
    acc = _acc_dtype(hidden_NKD.dtype)
    w_M = weights_K.to(hidden_NKD.device, acc).expand(N, K).reshape(-1)[idx_M]
    low_MR = None if lowrank_NKR is None else lowrank_NKR.reshape(N * K, -1)[idx_M]
    ce_M, tv_M, argmax_M = _ChunkedCETV.apply(
        hidden_NKD.reshape(N * K, D)[idx_M], lm_weight_VD,
        target_hidden_NKD.reshape(N * K, D)[idx_M].detach(), labels_M,
        low_MR, lowrank_weight_RV, chunk_size, compile_chunks, int(keep_probs_mb * 2**20),
    )
    ce_sum, tv_sum = (w_M * ce_M).sum(), (w_M * tv_M).sum()
    accept_M = (1.0 - 0.5 * tv_M.detach()).clamp(0.0, 1.0)
    conf_sum = w_M.new_zeros(())
    if conf_logit_NK is not None:
        conf_M = conf_logit_NK.reshape(-1)[idx_M].to(acc)
        conf_sum = F.binary_cross_entropy_with_logits(conf_M, accept_M, weight=w_M, reduction="sum")

    terms = [a * t for a, t in ((alpha_ce, ce_sum), (alpha_tv, tv_sum), (alpha_conf, conf_sum))
             if a != 0.0]  # a zero alpha keeps its term out of the graph: no backward work
    loss_sum = sum(terms[1:], terms[0]) if terms else ce_M.sum() * 0.0

    accept_NK = torch.zeros(N * K, dtype=acc, device=hidden_NKD.device)
    accept_NK[idx_M] = accept_M
    correct_NK = torch.zeros(N * K, dtype=torch.bool, device=hidden_NKD.device)
    correct_NK[idx_M] = argmax_M == labels_M
    return DistillLossOutput(
        loss_sum=loss_sum, ce_sum=ce_sum.detach(), tv_sum=tv_sum.detach(),
        conf_sum=conf_sum.detach(), weight_sum=w_M.sum(), accept_NK=accept_NK.view(N, K),
        correct_NK=correct_NK.view(N, K), valid_NK=valid_NK,
    )


def block_tau(accept_NK: Tensor, valid_NK: Tensor) -> Tensor:
    """Per-block simulated acceptance length 1 + sum_k prod_{i<=k} a_i, float32 [N].

    A block's product runs over its supervised prefix only: it stops at the first
    invalid position, and later positions add nothing even if marked valid. A block
    with no supervised position gets tau = 1 (only the bonus token)."""
    prefix_NK = valid_NK.bool().int().cumprod(dim=1).bool()
    a_NK = torch.where(prefix_NK, accept_NK.float(), 0.0)
    return 1.0 + a_NK.cumprod(dim=1).sum(dim=1)


def simulated_tau(accept_NK: Tensor, valid_NK: Tensor) -> Tensor:
    """Mean of `block_tau` over blocks with a non-empty supervised prefix (valid at k=1);
    blocks without supervision carry no information and are excluded; NaN if none is left.
    For a global figure across ranks, all-reduce block_tau's sum and the block count."""
    has_any = valid_NK.bool()[:, :1].reshape(-1)
    return block_tau(accept_NK, valid_NK)[has_any].mean()


# ------------------------------------------------------------------ Eagle3 soft CE


def eagle3_row_weights(valid_NK: Tensor, weights_K: Tensor, seq_len: int, per_sequence: bool) -> Tensor:
    """Weight of each (row, TTT step) in the Eagle3 loss sum, rows n = b * seq_len + t.

    Token mean (``per_sequence=False``): w_k on every valid row; after the trainer divides by the
    global weight sum, every supervised token counts the same, so long answers dominate.
    Per-sequence mean (the reference's choice): w_k / n_bk, with n_bk the valid rows of sequence b at
    step k; the weights then sum to w_k per sequence and step, and every sequence counts the same.
    """
    N, K = valid_NK.shape
    if N % seq_len:
        raise ValueError(f"eagle3_row_weights: {N} rows are not whole sequences of {seq_len}")
    w_K = weights_K.to(valid_NK.device, torch.float32)
    valid = valid_NK.float()
    if not per_sequence:
        return valid * w_K
    v_BTK = valid.view(N // seq_len, seq_len, K)
    return (v_BTK / v_BTK.sum(1, keepdim=True).clamp_min(1.0) * w_K).view(N, K)


class _ChunkedSoftCE(torch.autograd.Function):
    """Per-row -sum_v q_v log p_d(v) over the draft vocabulary, chunked; q = softmax of the
    target logits of the draft vocabulary's target ids. Also 1 - TV and both argmaxes."""

    @staticmethod
    def forward(ctx, h_MD, wd_vD, th_MD, wt_VD, d2t_v, chunk_size):
        M, v = h_MD.shape[0], wd_vD.shape[0]
        acc = _acc_dtype(h_MD.dtype)
        chunks = _chunks(v, chunk_size)
        lse_d_parts, lse_q_parts, qz_parts = [], [], []
        best_d, best_q = _no_argmax(M, acc, h_MD.device), _no_argmax(M, acc, h_MD.device)
        for c0, c1 in chunks:  # pass 1: normalisers and the unnormalised sum q z per chunk
            z = _logits(h_MD, wd_vD[c0:c1], acc)
            t = _logits(th_MD, wt_VD[d2t_v[c0:c1]], acc)
            lse_d_parts.append(torch.logsumexp(z, dim=1))
            lse_q_c = torch.logsumexp(t, dim=1)
            lse_q_parts.append(lse_q_c)
            qz_parts.append((torch.softmax(t, dim=1) * z).sum(dim=1))  # chunk-local q
            best_d = _update_argmax(best_d, *z.max(dim=1), c0)
            best_q = _update_argmax(best_q, *t.max(dim=1), c0)
        lse_d = torch.logsumexp(torch.stack(lse_d_parts, 1), dim=1)
        lse_q_Mn = torch.stack(lse_q_parts, 1)
        lse_q = torch.logsumexp(lse_q_Mn, dim=1)
        chunk_mass = torch.exp(lse_q_Mn - lse_q[:, None])  # share of q in each chunk
        loss = lse_d - (chunk_mass * torch.stack(qz_parts, 1)).sum(dim=1)  # sum q = 1
        tv = torch.zeros_like(lse_d)
        for c0, c1 in chunks:  # pass 2: ||p_d - q||_1 for the acceptance metric
            p = _logits(h_MD, wd_vD[c0:c1], acc).sub_(lse_d[:, None]).exp_()
            q = _logits(th_MD, wt_VD[d2t_v[c0:c1]], acc).sub_(lse_q[:, None]).exp_()
            tv += q.sub_(p).abs_().sum(dim=1)
        ctx.save_for_backward(h_MD, wd_vD, th_MD, wt_VD, d2t_v, lse_d, lse_q)
        ctx.chunk_size = chunk_size
        accept = (1.0 - 0.5 * tv).clamp_(0.0, 1.0)
        correct = best_d[1] == best_q[1]
        ctx.mark_non_differentiable(accept, correct)
        ctx.set_materialize_grads(False)
        return loss, accept, correct

    @staticmethod
    def backward(ctx, g_loss, _g_acc, _g_cor):
        h_MD, wd_vD, th_MD, wt_VD, d2t_v, lse_d, lse_q = ctx.saved_tensors
        if g_loss is None or not ctx.needs_input_grad[0]:
            return (None,) * 6
        acc = lse_d.dtype
        grad_h = torch.zeros(h_MD.shape, dtype=acc, device=h_MD.device)
        for c0, c1 in _chunks(wd_vD.shape[0], ctx.chunk_size):
            p = _logits(h_MD, wd_vD[c0:c1], acc).sub_(lse_d[:, None]).exp_()
            q = _logits(th_MD, wt_VD[d2t_v[c0:c1]], acc).sub_(lse_q[:, None]).exp_()
            g_z = p.sub_(q).mul_(g_loss.to(acc)[:, None])  # d/dz of soft CE = p_d - q
            grad_h += _mm(g_z.to(h_MD.dtype), wd_vD[c0:c1].to(h_MD.dtype), acc)
        return grad_h.to(h_MD.dtype), None, None, None, None, None


def eagle_soft_ce(
    hidden_NKD: Tensor,
    draft_lm_weight_vD: Tensor,
    target_hidden_NKD: Tensor,
    target_lm_weight_VD: Tensor,
    valid_NK: Tensor,
    weights_K: Tensor,
    draft_to_target_v: Tensor | None = None,
    chunk_size: int = 16384,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Eagle3 soft cross-entropy sum (docs/algorithms.md) over N rows of K TTT steps.

    loss = sum_{valid} w * (-sum_v q_v log p_d(v)) with p_d = softmax(h Wd^T) over the
    draft vocabulary (size v) and q = softmax over v of the target logits
    target_hidden @ Wt[draft_to_target_v]^T, i.e. the target distribution restricted
    to the draft vocabulary and renormalised. draft_to_target_v holds the *absolute*
    target id of each draft entry (i + d2t[i] for the offset form); None means the
    vocabularies are the same. Both LM heads are frozen. weights_K: w per step [K], or per row and
    step [N, K] (`eagle3_row_weights`).

    Returns (loss_sum differentiable, weight_sum, accept_NK = 1 - 0.5||p_d - q||_1,
    correct_NK = argmax p_d == argmax q), metrics detached and zero/False where invalid.
    """
    N, K, D = hidden_NKD.shape
    v, V = draft_lm_weight_vD.shape[0], target_lm_weight_VD.shape[0]
    _check_shape("target_hidden_NKD", target_hidden_NKD, (N, K, target_lm_weight_VD.shape[1]))
    _check_shape("draft_lm_weight_vD", draft_lm_weight_vD, (v, D))
    _check_shape("valid_NK", valid_NK, (N, K))
    _check_shape("weights_K", weights_K, (N, K) if weights_K.dim() == 2 else (K,))
    _check_frozen("draft_lm_weight_vD", draft_lm_weight_vD)
    _check_frozen("target_lm_weight_VD", target_lm_weight_VD)
    if draft_to_target_v is None:
        if v != V:
            raise ValueError(f"draft vocab {v} != target vocab {V}: pass draft_to_target_v.")
        draft_to_target_v = torch.arange(V, device=hidden_NKD.device)
    _check_shape("draft_to_target_v", draft_to_target_v, (v,))
    d2t_v = draft_to_target_v.to(hidden_NKD.device).long()
    if v and (d2t_v.min() < 0 or d2t_v.max() >= V):
        raise ValueError(
            f"draft_to_target_v must hold target ids in [0, {V}); got [{int(d2t_v.min())}, "
            f"{int(d2t_v.max())}]. Offsets d2t need converting: target_id = i + d2t[i]."
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")

    valid_NK = valid_NK.bool()
    idx_M = valid_NK.reshape(-1).nonzero()[:, 0]
    acc = _acc_dtype(hidden_NKD.dtype)
    w_M = weights_K.to(hidden_NKD.device, acc).expand(N, K).reshape(-1)[idx_M]  # [K] or [N, K]
    loss_M, accept_M, correct_M = _ChunkedSoftCE.apply(
        hidden_NKD.reshape(N * K, D)[idx_M], draft_lm_weight_vD,
        target_hidden_NKD.reshape(N * K, -1)[idx_M].detach(), target_lm_weight_VD, d2t_v,
        chunk_size,
    )
    loss_sum = (w_M * loss_M).sum()
    accept_NK = torch.zeros(N * K, dtype=acc, device=hidden_NKD.device)
    accept_NK[idx_M] = accept_M
    correct_NK = torch.zeros(N * K, dtype=torch.bool, device=hidden_NKD.device)
    correct_NK[idx_M] = correct_M
    return loss_sum, w_M.sum(), accept_NK.view(N, K), correct_NK.view(N, K)
