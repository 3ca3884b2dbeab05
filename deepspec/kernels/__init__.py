"""Fused speculative-decoding verification: one call per round for a batch of requests.

``verify`` is the accept/reject step of speculative decoding (docs/engine.md) for B requests at once.  It has
two backends that agree exactly given the same uniforms: a plain-PyTorch
reference (``reference.py``) and a single Triton launch (``triton_verify.py``).
Triton is imported lazily, only when that backend is chosen.
"""

from __future__ import annotations

import functools

import torch

from deepspec.kernels.reference import VerifyResult, verify_reference

__all__ = ["VerifyResult", "verify", "verify_reference", "triton_available"]

BACKENDS = ("auto", "triton", "reference")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when the Triton verification kernel can be imported."""
    try:
        import deepspec.kernels.triton_verify  # noqa: F401
    except Exception:  # ImportError, or a broken triton install failing at import
        return False
    return True


def verify(
    draft_tokens_BK: torch.Tensor,
    draft_probs_BKV: torch.Tensor | None,
    target_probs_BK1V: torch.Tensor,
    num_drafts_B: torch.Tensor,
    uniforms_BK1: torch.Tensor | None,
    eos_id: int | None,
    greedy: bool,
    backend: str = "auto",
    *,
    generator: torch.Generator | None = None,
) -> VerifyResult:
    """Accept/reject one round of drafts for B requests and pick the tokens to commit.

    Shapes: B requests, K = max drafts per request (gamma), K1 = K + 1, V = vocab.

    draft_tokens_BK: proposed tokens x_1..x_K (int); entries at k >= num_drafts are ignored.
    draft_probs_BKV: draft distribution p_d at each draft position, or None for a
        deterministic draft (p_d one-hot on the proposed token).  Unused when greedy.
    target_probs_BK1V: target distribution p_t at anchor..anchor+K, i.e. row k scores
        x_{k+1} and row num_drafts gives the bonus.  In greedy mode logits work too.
    num_drafts_B: drafts to verify per request, 0..K (clamped), so requests can verify
        different prefix lengths (confidence truncation, the prefix scheduler).
    uniforms_BK1: float32 uniforms in [0, 1), or None to draw them with ``generator``.
        Unused when greedy.
    eos_id: if an accepted draft equals it, the round stops right after it (no
        correction/bonus).  None disables the check.
    greedy: accept x_k while x_k == argmax p_t[k] (first index on ties); then commit
        argmax p_t[accepted] (the correction, or the bonus when all were accepted).
    backend: "auto" (Triton for CUDA tensors when triton imports, else reference),
        "triton" (CPU tensors need TRITON_INTERPRET=1 before triton is imported) or
        "reference".

    Sampling rule and uniform consumption (both backends, exactly):
      * draft k (0-based column) is accepted iff ``u[:, k] * p_d(x_k) < p_t(x_k)`` in
        float32 (= u < min(1, p_t/p_d)); a token outside [0, V) is rejected; the first
        rejection ends the round; columns past it are not used.
      * the final token uses column K only: on rejection at k it is drawn from
        norm(max(0, p_t[k] - p_d[k])), falling back to p_t[k] when that residual is
        all zero; if every proposed draft was accepted it is the bonus drawn from
        p_t[num_drafts].  The draw is an inverse CDF over integer masses
        ``trunc(max(r, 0) * 2**36)``: the smallest i with cumsum[i] > floor(u * total).
      * after an accepted EOS no final token is drawn and column K is unused.

    Returns VerifyResult(accepted_B, committed_BK1, num_committed_B), int64 on the
    input device: committed_BK1 holds the accepted drafts then the final token,
    padded with -1; num_committed_B = accepted_B + 1 unless an EOS ended the round.
    """
    if backend not in BACKENDS:
        raise ValueError(f"verify: backend={backend!r} is unknown; use one of {BACKENDS}")
    uniforms_BK1 = _check_inputs(
        draft_tokens_BK, draft_probs_BKV, target_probs_BK1V, num_drafts_B, uniforms_BK1, greedy, generator
    )
    use_triton = backend == "triton" or (
        backend == "auto" and draft_tokens_BK.device.type == "cuda" and triton_available()
    )
    if use_triton:
        from deepspec.kernels.triton_verify import verify_triton

        return verify_triton(
            draft_tokens_BK, draft_probs_BKV, target_probs_BK1V, num_drafts_B, uniforms_BK1, eos_id, greedy
        )
    return verify_reference(
        draft_tokens_BK, draft_probs_BKV, target_probs_BK1V, num_drafts_B, uniforms_BK1, eos_id, greedy
    )


def _check_inputs(
    draft_tokens_BK: torch.Tensor,
    draft_probs_BKV: torch.Tensor | None,
    target_probs_BK1V: torch.Tensor,
    num_drafts_B: torch.Tensor,
    uniforms_BK1: torch.Tensor | None,
    greedy: bool,
    generator: torch.Generator | None,
) -> torch.Tensor | None:
    """Validate shapes/dtypes/devices (no device sync); return float32 uniforms or None."""
    if draft_tokens_BK.dim() != 2 or draft_tokens_BK.dtype.is_floating_point:
        raise ValueError(
            f"verify: draft_tokens_BK must be an integer [B, K] tensor, got {draft_tokens_BK.dtype} "
            f"{tuple(draft_tokens_BK.shape)}"
        )
    B, K = draft_tokens_BK.shape
    if K < 1:
        raise ValueError("verify: draft_tokens_BK has K=0 columns; pass K >= 1 and num_drafts_B=0 instead")
    if target_probs_BK1V.dim() != 3 or tuple(target_probs_BK1V.shape[:2]) != (B, K + 1):
        raise ValueError(
            f"verify: target_probs_BK1V must be [B, K+1, V] = [{B}, {K + 1}, V] (rows anchor..anchor+K), "
            f"got {tuple(target_probs_BK1V.shape)}"
        )
    V = target_probs_BK1V.shape[-1]
    if not target_probs_BK1V.dtype.is_floating_point:
        raise ValueError(f"verify: target_probs_BK1V must be floating point, got {target_probs_BK1V.dtype}")
    if draft_probs_BKV is not None and not greedy and tuple(draft_probs_BKV.shape) != (B, K, V):
        raise ValueError(
            f"verify: draft_probs_BKV must be [B, K, V] = [{B}, {K}, {V}] or None, "
            f"got {tuple(draft_probs_BKV.shape)}"
        )
    if tuple(num_drafts_B.shape) != (B,) or num_drafts_B.dtype.is_floating_point:
        raise ValueError(
            f"verify: num_drafts_B must be an integer [B]=[{B}] tensor, got {num_drafts_B.dtype} "
            f"{tuple(num_drafts_B.shape)}"
        )
    device = draft_tokens_BK.device
    tensors = {"target_probs_BK1V": target_probs_BK1V, "num_drafts_B": num_drafts_B}
    if draft_probs_BKV is not None and not greedy:
        tensors["draft_probs_BKV"] = draft_probs_BKV
    if not greedy:
        if uniforms_BK1 is None:
            uniforms_BK1 = torch.rand((B, K + 1), device=device, generator=generator)
        if tuple(uniforms_BK1.shape) != (B, K + 1):
            raise ValueError(
                f"verify: uniforms_BK1 must be [B, K+1] = [{B}, {K + 1}] (K acceptance tests + 1 final draw), "
                f"got {tuple(uniforms_BK1.shape)}"
            )
        tensors["uniforms_BK1"] = uniforms_BK1
    for name, tensor in tensors.items():
        if tensor.device != device:
            raise ValueError(f"verify: {name} is on {tensor.device} but draft_tokens_BK is on {device}")
    return None if greedy else uniforms_BK1.to(torch.float32)
