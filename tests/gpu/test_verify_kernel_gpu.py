"""Triton verification kernel == PyTorch reference on CUDA at production sizes
(B=64 requests, gamma=7, DeepSeek-V4 and SmolLM2 vocabularies), plus losslessness of
the compiled kernel itself."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("triton")

from deepspec.kernels import verify, verify_reference  # noqa: E402
from deepspec.kernels.triton_verify import verify_triton  # noqa: E402


def _realistic_case(seed, B, K, V, greedy, with_draft_probs, eos_id, dtype):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(B, K + 1, V, generator=g, device="cuda") * 4
    p_t = torch.softmax(logits, -1)
    p_d = torch.softmax(logits[:, :K] + torch.randn(B, K, V, generator=g, device="cuda"), -1)
    drafts = torch.multinomial(p_d.reshape(-1, V), 1, generator=g).reshape(B, K)
    if greedy:
        take = torch.rand(B, K, generator=g, device="cuda") < 0.85
        drafts = torch.where(take, p_t[:, :K].argmax(-1), drafts)
    if eos_id is not None:
        drafts[torch.rand(B, K, generator=g, device="cuda") < 0.05] = eos_id
    return dict(
        draft_tokens_BK=drafts,
        draft_probs_BKV=p_d.to(dtype) if with_draft_probs else None,
        target_probs_BK1V=p_t.to(dtype),
        num_drafts_B=torch.randint(0, K + 1, (B,), generator=g, device="cuda"),
        uniforms_BK1=torch.rand(B, K + 1, generator=g, device="cuda"),
        eos_id=eos_id,
        greedy=greedy,
    )


@pytest.mark.parametrize("V", [129280, 49152])
@pytest.mark.parametrize("greedy", [True, False])
@pytest.mark.parametrize("with_draft_probs", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference_at_production_size(V, greedy, with_draft_probs, dtype):
    for seed in range(3):
        case = _realistic_case(seed, 64, 7, V, greedy, with_draft_probs, 1 if seed == 2 else None, dtype)
        ref = verify_reference(**case)
        ker = verify_triton(**case)
        assert torch.equal(ref.accepted_B, ker.accepted_B)
        assert torch.equal(ref.committed_BK1, ker.committed_BK1)
        assert torch.equal(ref.num_committed_B, ker.num_committed_B)
        # auto on CUDA is the kernel
        assert torch.equal(verify(**case).committed_BK1, ker.committed_BK1)


def test_compiled_kernel_is_lossless():
    N, K, V = 400_000, 3, 6
    g = torch.Generator(device="cuda").manual_seed(0)
    p_t = torch.softmax(torch.randn(K + 1, V, generator=g, device="cuda") * 1.5, -1)
    p_d = torch.softmax(torch.randn(K, V, generator=g, device="cuda") * 1.5, -1)
    drafts = torch.stack([torch.multinomial(p_d[k], N, True, generator=g) for k in range(K)], 1)
    res = verify_triton(
        drafts, p_d.expand(N, -1, -1).contiguous(), p_t.expand(N, -1, -1).contiguous(),
        torch.full((N,), K, device="cuda"), torch.rand(N, K + 1, generator=g, device="cuda"), None, False,
    )
    first = res.committed_BK1[:, 0]
    counts = torch.bincount(first, minlength=V).double()
    expected = p_t[0].double() * N
    assert float(((counts - expected) ** 2 / expected).sum()) < 30.0
