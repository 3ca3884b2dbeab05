"""Plain-PyTorch reference for the fused verification step (docs/algorithms.md, docs/engine.md).

This is the specification the Triton kernel in ``triton_verify.py`` must match
bit for bit: same acceptance test, same integer inverse-CDF draw, same use of
the uniforms.  The rules are documented once, on ``deepspec.kernels.verify``;
the helpers here only restate the two numeric conventions both sides share:

* acceptance of draft ``k`` is ``u[k] * p_d(x_k) < p_t(x_k)`` in float32, which
  is ``u < min(1, p_t/p_d)`` without a division (so no rounding mode can differ);
* the final draw quantises the (residual) distribution to integers
  ``q_i = trunc(max(r_i, 0) * 2**QUANT_BITS)`` and returns the smallest ``i`` with
  ``cumsum(q)[i] > floor(u * sum(q))``.  Integer sums are exact in any order, so a
  chunked GPU scan and ``torch.cumsum`` give the same token.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# 2**36 * vocab (< 2**17) stays below 2**53: the float64 product u * total is exact
# enough to floor deterministically, and the int64 sums cannot overflow.
QUANT_BITS = 36
QUANT_SCALE = float(2**QUANT_BITS)


class VerifyResult(NamedTuple):
    """Outcome of one verification round for a batch of B requests.

    accepted_B: number of accepted draft tokens per request (0..num_drafts).
    committed_BK1: tokens to append, left-aligned, padded with -1
        (accepted drafts, then the correction/bonus token unless EOS stopped it).
    num_committed_B: number of valid entries in ``committed_BK1`` (tau of this round).
    """

    accepted_B: torch.Tensor
    committed_BK1: torch.Tensor
    num_committed_B: torch.Tensor


def quantise_probs(probs_fp32: torch.Tensor) -> torch.Tensor:
    """Map non-negative float32 mass to exact int64 units (negative clamps to 0)."""
    return (probs_fp32.clamp_min(0.0) * QUANT_SCALE).to(torch.int64)


def inverse_cdf_int(q_BV: torch.Tensor, u_B: torch.Tensor) -> torch.Tensor:
    """Smallest index i with cumsum(q)[i] > floor(u * sum(q)), per row; clamped to V-1."""
    cdf_BV = torch.cumsum(q_BV, dim=-1)
    total_B = cdf_BV[:, -1]
    target_B = (u_B.to(torch.float64) * total_B.to(torch.float64)).to(torch.int64)
    index_B = (cdf_BV <= target_B[:, None]).sum(dim=-1)
    return index_B.clamp_max(q_BV.shape[-1] - 1)


def verify_reference(
    draft_tokens_BK: torch.Tensor,
    draft_probs_BKV: torch.Tensor | None,
    target_probs_BK1V: torch.Tensor,
    num_drafts_B: torch.Tensor,
    uniforms_BK1: torch.Tensor | None,
    eos_id: int | None,
    greedy: bool,
) -> VerifyResult:
    """Vectorised reference; arguments as in ``deepspec.kernels.verify`` (already validated)."""
    B, K = draft_tokens_BK.shape
    V = target_probs_BK1V.shape[-1]
    device = draft_tokens_BK.device
    rows_B = torch.arange(B, device=device)
    n_B = num_drafts_B.to(torch.int64).clamp(0, K)

    x_BK = draft_tokens_BK.to(torch.int64)
    in_vocab_BK = (x_BK >= 0) & (x_BK < V)
    x_safe_BK = x_BK.clamp(0, V - 1)
    proposed_BK = torch.arange(K, device=device)[None, :] < n_B[:, None]

    if greedy:
        argmax_BK1 = target_probs_BK1V.argmax(dim=-1)
        ok_BK = x_BK == argmax_BK1[:, :K]
    else:
        p_t_BK = target_probs_BK1V[:, :K].gather(-1, x_safe_BK[..., None])[..., 0].float()
        if draft_probs_BKV is None:
            p_d_BK = torch.ones_like(p_t_BK)
        else:
            p_d_BK = draft_probs_BKV.gather(-1, x_safe_BK[..., None])[..., 0].float()
        uniforms_BK1 = uniforms_BK1.float()
        ok_BK = uniforms_BK1[:, :K] * p_d_BK < p_t_BK
    accept_BK = ok_BK & in_vocab_BK & proposed_BK

    # Leading run of acceptances, cut right after the first accepted EOS.
    lead_BK = torch.cumprod(accept_BK.to(torch.int64), dim=1).bool()
    if eos_id is not None:
        eos_BK = lead_BK & (x_BK == eos_id)
        earlier_eos_BK = (torch.cumsum(eos_BK.to(torch.int64), dim=1) - eos_BK.to(torch.int64)) > 0
        lead_BK = lead_BK & ~earlier_eos_BK
        hit_eos_B = (lead_BK & eos_BK).any(dim=1)
    else:
        hit_eos_B = torch.zeros(B, dtype=torch.bool, device=device)
    accepted_B = lead_BK.sum(dim=1)
    j_B = accepted_B  # position of the correction / bonus token

    if greedy:
        final_B = argmax_BK1[rows_B, j_B]
    else:
        rejected_B = accepted_B < n_B
        p_t_BV = target_probs_BK1V[rows_B, j_B].float()
        j_draft_B = j_B.clamp_max(K - 1)
        if draft_probs_BKV is None:
            x_j_B = x_BK[rows_B, j_draft_B]
            p_d_BV = (torch.arange(V, device=device)[None, :] == x_j_B[:, None]).float()
        else:
            p_d_BV = draft_probs_BKV[rows_B, j_draft_B].float()
        p_d_BV = torch.where(rejected_B[:, None], p_d_BV, torch.zeros_like(p_d_BV))
        q_res_BV = quantise_probs(p_t_BV - p_d_BV)
        q_pt_BV = quantise_probs(p_t_BV)
        use_res_B = q_res_BV.sum(dim=-1) > 0
        q_BV = torch.where(use_res_B[:, None], q_res_BV, q_pt_BV)
        final_B = inverse_cdf_int(q_BV, uniforms_BK1[:, K])

    positions_BK1 = torch.arange(K + 1, device=device)[None, :]
    drafts_padded_BK1 = torch.cat([x_BK, x_BK.new_full((B, 1), -1)], dim=1)
    committed_BK1 = torch.where(positions_BK1 < accepted_B[:, None], drafts_padded_BK1, -1)
    has_final_B = ~hit_eos_B
    committed_BK1 = torch.where(
        (positions_BK1 == j_B[:, None]) & has_final_B[:, None], final_B[:, None], committed_BK1
    )
    num_committed_B = accepted_B + has_final_B.to(torch.int64)
    return VerifyResult(accepted_B, committed_BK1, num_committed_B)
