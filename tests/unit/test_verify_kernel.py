"""Fused verification: the acceptance rules (docs/algorithms.md) on hand-made cases, losslessness, and
Triton kernel == PyTorch reference exactly (kernel run under TRITON_INTERPRET=1 in a
subprocess, because the interpreter must be chosen before triton is first imported)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepspec.kernels import verify, verify_reference

REPO_ROOT = Path(__file__).resolve().parents[2]


def _ref(*args, **kwargs):
    return verify(*args, **kwargs, backend="reference")


def _one_hot_rows(tokens, V, dtype=torch.float32):
    return torch.nn.functional.one_hot(torch.tensor(tokens), V).to(dtype)


# ---------------------------------------------------------------- greedy rules


def test_greedy_all_accepted_commits_drafts_then_bonus():
    target = _one_hot_rows([[3, 1, 4, 2]], 6)  # argmax per row: 3 1 4 | bonus 2
    res = _ref(torch.tensor([[3, 1, 4]]), None, target, torch.tensor([3]), None, None, True)
    assert res.accepted_B.tolist() == [3]
    assert res.committed_BK1.tolist() == [[3, 1, 4, 2]]
    assert res.num_committed_B.tolist() == [4]


def test_greedy_first_rejected_commits_target_argmax_only():
    target = _one_hot_rows([[3, 1, 4, 2]], 6)
    res = _ref(torch.tensor([[5, 1, 4]]), None, target, torch.tensor([3]), None, None, True)
    assert res.accepted_B.tolist() == [0]
    assert res.committed_BK1.tolist() == [[3, -1, -1, -1]]
    assert res.num_committed_B.tolist() == [1]


def test_greedy_eos_inside_block_stops_without_bonus():
    target = _one_hot_rows([[3, 0, 4, 2]], 6)
    res = _ref(torch.tensor([[3, 0, 4]]), None, target, torch.tensor([3]), None, 0, True)
    assert res.accepted_B.tolist() == [2]
    assert res.committed_BK1.tolist() == [[3, 0, -1, -1]]
    assert res.num_committed_B.tolist() == [2]


def test_num_drafts_limits_verification_per_request():
    target = _one_hot_rows([[3, 1, 4, 2], [3, 1, 4, 2]], 6)
    drafts = torch.tensor([[3, 1, 4], [3, 1, 4]])
    res = _ref(drafts, None, target, torch.tensor([0, 2]), None, None, True)
    # n=0: only the bonus of row 0; n=2: drafts 3,1 then bonus from row 2 (4), draft 4 ignored.
    assert res.committed_BK1.tolist() == [[3, -1, -1, -1], [3, 1, 4, -1]]
    assert res.accepted_B.tolist() == [0, 2]
    assert res.num_committed_B.tolist() == [1, 3]


def test_greedy_ties_pick_first_index():
    target = torch.tensor([[[0.4, 0.4, 0.2], [0.1, 0.45, 0.45]]])
    res = _ref(torch.tensor([[1]]), None, target, torch.tensor([1]), None, None, True)
    assert res.committed_BK1.tolist() == [[0, -1]]


# ---------------------------------------------------------------- sampling rules


def test_sampling_acceptance_threshold_is_ratio():
    p_t = torch.tensor([[[0.2, 0.8, 0.0], [0.5, 0.5, 0.0]]])
    p_d = torch.tensor([[[0.4, 0.6, 0.0]]])  # ratio for token 0: 0.5
    drafts = torch.tensor([[0]])
    below = _ref(drafts, p_d, p_t, torch.tensor([1]), torch.tensor([[0.49, 0.0]]), None, False)
    above = _ref(drafts, p_d, p_t, torch.tensor([1]), torch.tensor([[0.51, 0.0]]), None, False)
    assert below.accepted_B.tolist() == [1] and below.committed_BK1.tolist() == [[0, 0]]
    # rejected: residual max(0, p_t - p_d) = [0, 0.2, 0] so the correction must be token 1.
    assert above.accepted_B.tolist() == [0] and above.committed_BK1.tolist() == [[1, -1]]


def test_zero_target_probability_is_never_accepted():
    p_t = torch.tensor([[[0.0, 1.0], [0.5, 0.5]]])
    res = _ref(torch.tensor([[0]]), None, p_t, torch.tensor([1]), torch.zeros(1, 2), None, False)
    assert res.accepted_B.tolist() == [0] and res.committed_BK1[0, 0].item() == 1


@pytest.mark.parametrize("u, expected", [(0.05, 0), (0.35, 2), (0.99, 3), (0.0, 0)])
def test_bonus_inverse_cdf(u, expected):
    p_t = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]]])
    res = _ref(torch.tensor([[0]]), None, p_t, torch.tensor([0]), torch.tensor([[0.7, u]]), None, False)
    assert res.committed_BK1.tolist() == [[expected, -1]]


def test_inverse_cdf_skips_zero_mass_tokens():
    p_t = torch.tensor([[[0.5, 0.0, 0.5], [1.0, 0.0, 0.0]]])
    res = _ref(torch.tensor([[0]]), None, p_t, torch.tensor([0]), torch.tensor([[0.0, 0.5]]), None, False)
    assert res.committed_BK1[0, 0].item() == 2


def test_residual_all_zero_falls_back_to_target():
    # p_d >= p_t everywhere (an unnormalised draft), token 0 rejected: residual is all zero.
    p_t = torch.tensor([[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]])
    p_d = torch.tensor([[[0.6, 0.5, 0.0]]])
    for u_final, expected in [(0.25, 0), (0.75, 1)]:
        u = torch.tensor([[0.9, u_final]])
        res = _ref(torch.tensor([[0]]), p_d, p_t, torch.tensor([1]), u, None, False)
        assert res.accepted_B.tolist() == [0]
        assert res.committed_BK1.tolist() == [[expected, -1]]


def test_sampling_eos_accepted_stops_round():
    p_t = torch.full((1, 4, 5), 0.2)
    res = _ref(torch.tensor([[1, 4, 2]]), None, p_t, torch.tensor([3]), torch.zeros(1, 4), 4, False)
    assert res.accepted_B.tolist() == [2]
    assert res.committed_BK1.tolist() == [[1, 4, -1, -1]]
    assert res.num_committed_B.tolist() == [2]


def test_invalid_inputs_name_the_argument():
    drafts, target = torch.tensor([[1, 2]]), torch.rand(1, 3, 5)
    with pytest.raises(ValueError, match="target_probs_BK1V"):
        _ref(drafts, None, torch.rand(1, 2, 5), torch.tensor([2]), None, None, True)
    with pytest.raises(ValueError, match="uniforms_BK1"):
        _ref(drafts, None, target, torch.tensor([2]), torch.rand(1, 2), None, False)
    with pytest.raises(ValueError, match="draft_probs_BKV"):
        _ref(drafts, torch.rand(1, 2, 4), target, torch.tensor([2]), None, None, False)
    with pytest.raises(ValueError, match="backend"):
        verify(drafts, None, target, torch.tensor([2]), None, None, True, backend="cuda")


# ---------------------------------------------------------------- losslessness

CHI2_LIMIT_DF5 = 30.0  # upper 1.5e-5 quantile of chi-square(5): generous, the seed is fixed anyway


def _chi2(tokens, probs):
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    return float(((counts - expected) ** 2 / expected).sum())


def _lossless_setup(n_rounds, K=3, V=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    p_t_K1V = torch.softmax(torch.randn(K + 1, V, generator=g) * 1.5, -1)
    p_d_KV = torch.softmax(torch.randn(K, V, generator=g) * 1.5, -1)
    drafts_NK = torch.stack([torch.multinomial(p_d_KV[k], n_rounds, True, generator=g) for k in range(K)], 1)
    uniforms = torch.rand(n_rounds, K + 1, generator=g)
    return p_t_K1V, p_d_KV, drafts_NK, uniforms


def test_sampled_tokens_follow_target_distribution():
    N, K = 200_000, 3
    p_t, p_d, drafts, u = _lossless_setup(N, K)
    res = verify_reference(
        drafts, p_d.expand(N, -1, -1), p_t.expand(N, -1, -1), torch.full((N,), K), u, None, False
    )
    first = res.committed_BK1[:, 0]
    assert _chi2(first, p_t[0]) < CHI2_LIMIT_DF5
    # the test has power: committing the raw draft would be caught at once
    assert _chi2(drafts[:, 0], p_t[0]) > 100 * CHI2_LIMIT_DF5
    # second committed token, in rounds where x1 survived, follows p_t[1]
    second = res.committed_BK1[res.accepted_B >= 1, 1]
    assert second.numel() > 50_000
    assert _chi2(second, p_t[1]) < CHI2_LIMIT_DF5
    # tau agrees with 1 + sum_k prod_{i<=k} (1 - TV_i)
    alpha = 1 - 0.5 * (p_t[:K] - p_d).abs().sum(-1)
    tau_expected = 1 + torch.cumprod(alpha, 0).sum()
    assert abs(res.num_committed_B.double().mean().item() - tau_expected.item()) < 0.02
    try:
        from scipy.stats import chisquare
    except ImportError:
        return
    counts = torch.bincount(first, minlength=6).numpy()
    expected = (p_t[0].double() / p_t[0].double().sum()).numpy() * N
    assert chisquare(counts, expected).pvalue > 1e-5


def test_deterministic_draft_is_lossless():
    N, V = 100_000, 6
    g = torch.Generator().manual_seed(1)
    p_t = torch.softmax(torch.randn(2, V, generator=g), -1)
    drafts = torch.full((N, 1), int(p_t[0].argmax()))  # a greedy draft: p_d one-hot
    res = verify_reference(
        drafts, None, p_t.expand(N, -1, -1), torch.ones(N, dtype=torch.long), torch.rand(N, 2, generator=g),
        None, False,
    )
    assert _chi2(res.committed_BK1[:, 0], p_t[0]) < CHI2_LIMIT_DF5


# ---------------------------------------------------------------- kernel == reference


def random_case(seed: int, B: int, K: int, V: int, greedy: bool, with_draft_probs: bool,
                eos_id: int | None, dtype: torch.dtype, device: str = "cpu") -> dict:
    """Inputs that hit every branch: ties, zero mass, p_d == p_t rows, EOS, bad tokens, n < K."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, K + 1, V, generator=g) * 3
    if seed % 3 == 0:
        logits = logits.round()  # many exact ties for argmax
    if seed % 4 == 1:
        logits[torch.rand(B, K + 1, V, generator=g) < 0.7] = float("-inf")  # sparse p_t
        logits[..., V // 2] = 0.0  # leading tokens may have zero mass: u = 0 must skip them
    p_t = torch.softmax(logits, -1)
    p_d = torch.softmax(logits[:, :K] + torch.randn(B, K, V, generator=g) * 0.7, -1)
    same = torch.rand(B, K, generator=g) < 0.2
    p_d[same] = p_t[:, :K][same] * 1.25  # p_d >= p_t (unnormalised): rejection leaves zero residual
    drafts = torch.multinomial(p_d.reshape(-1, V), 1, generator=g).reshape(B, K)
    if greedy:
        take_argmax = torch.rand(B, K, generator=g) < 0.8
        drafts = torch.where(take_argmax, p_t[:, :K].argmax(-1), drafts)
    if eos_id is not None:
        drafts[torch.rand(B, K, generator=g) < 0.15] = eos_id
    drafts[torch.rand(B, K, generator=g) < 0.03] = V  # out of vocabulary: always rejected
    num_drafts = torch.randint(0, K + 1, (B,), generator=g)
    uniforms = torch.rand(B, K + 1, generator=g)
    uniforms[torch.rand(B, K + 1, generator=g) < 0.05] = 0.0
    uniforms[torch.rand(B, generator=g) < 0.25, K] = 0.0
    tensors = dict(
        draft_tokens_BK=drafts, draft_probs_BKV=p_d.to(dtype) if with_draft_probs else None,
        target_probs_BK1V=p_t.to(dtype), num_drafts_B=num_drafts, uniforms_BK1=uniforms,
    )
    tensors = {k: (v.to(device) if v is not None else None) for k, v in tensors.items()}
    return dict(**tensors, eos_id=eos_id, greedy=greedy)


def case_grid() -> list[tuple]:
    """(seed, B, K, V, greedy, with_draft_probs, eos_id, dtype, block_v) covering all branches."""
    grid = []
    seed = 0
    for greedy in (True, False):
        for with_dp in (True, False):
            for eos in (None, 2):
                for dtype, V, block in ((torch.float32, 100, 32), (torch.bfloat16, 37, 16), (torch.float16, 64, 64)):
                    grid.append((seed, 6, 4, V, greedy, with_dp, eos, dtype, block))
                    seed += 1
    return grid


def compare_cases_in_this_process() -> dict:
    """Run every case through kernel and reference; return counts (needs interpreter or CUDA)."""
    from deepspec.kernels.triton_verify import verify_triton

    checked, mismatches = 0, []
    for seed, B, K, V, greedy, with_dp, eos, dtype, block in case_grid():
        case = random_case(seed, B, K, V, greedy, with_dp, eos, dtype)
        ref = verify_reference(**case)
        ker = verify_triton(**case, block_v=block)
        checked += 1
        if not all(torch.equal(a, b) for a, b in zip(ref, ker, strict=True)):
            mismatches.append(dict(seed=seed, ref=ref.committed_BK1.tolist(), ker=ker.committed_BK1.tolist()))
    return dict(checked=checked, mismatches=mismatches)


def test_cases_cover_every_branch():
    """Guard the comparison below against vacuous inputs: each rule must occur in the grid."""
    seen = dict(all_accepted=0, rejected=0, eos=0, zero_residual=0, n_zero=0)
    for seed, B, K, V, greedy, with_dp, eos, dtype, _ in case_grid():
        case = random_case(seed, B, K, V, greedy, with_dp, eos, dtype)
        res = verify_reference(**case)
        n = case["num_drafts_B"]
        seen["all_accepted"] += int(((res.accepted_B == n) & (n > 0) & (res.num_committed_B > n)).sum())
        seen["rejected"] += int((res.accepted_B < n).sum())
        seen["eos"] += int((res.num_committed_B == res.accepted_B).sum())
        seen["n_zero"] += int((n == 0).sum())
        if not greedy and with_dp:
            rej = (res.accepted_B < n).nonzero().flatten()
            j = res.accepted_B[rej]
            resid = (case["target_probs_BK1V"][rej, j].float() - case["draft_probs_BKV"][rej, j].float())
            seen["zero_residual"] += int((resid.clamp_min(0).sum(-1) == 0).sum())
    assert all(v > 0 for v in seen.values()), seen


_SUBPROCESS = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("vk_test", sys.argv[1])
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
from deepspec.kernels.triton_verify import is_interpreted
out = mod.compare_cases_in_this_process(); out["interpreted"] = is_interpreted()
print("RESULT" + json.dumps(out))
"""


def test_triton_kernel_matches_reference_in_interpreter():
    triton = pytest.importorskip("triton")
    if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 9):
        pytest.skip(f"triton {triton.__version__}: the interpreter before 3.9 cannot run this kernel")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS, __file__], cwd=REPO_ROOT, env=env,
        capture_output=True, text=True, timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    out = json.loads(lines[-1][len("RESULT"):])
    assert out["interpreted"] is True
    assert out["checked"] == len(case_grid())
    assert out["mismatches"] == []


def test_triton_backend_on_cpu_without_interpreter_explains_fix():
    pytest.importorskip("triton")
    from deepspec.kernels.triton_verify import is_interpreted

    if is_interpreted():
        pytest.skip("this process imported triton in interpreter mode")
    case = random_case(0, 2, 2, 8, True, False, None, torch.float32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        verify(**case, backend="triton")


def test_auto_backend_on_cpu_uses_reference():
    case = random_case(5, 4, 3, 20, False, True, 2, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(verify(**case), verify_reference(**case), strict=True))
