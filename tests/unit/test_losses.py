"""deepspec.losses against a naive full-vocabulary float64 reference.

Protects: values and gradients of the chunked CE / TV / confidence / Eagle3 soft-CE
(for every chunk size, incl. ones that do not divide V), masking of invalid
positions, the zero-alpha paths, the frozen-head guard, and that no [N, V] tensor is
ever created.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from deepspec.losses import (
    block_tau, distill_losses, eagle_soft_ce, position_weights, simulated_tau,
)

N, K, D, V, R = 3, 4, 6, 37, 5
CHUNKS = [1, 8, 16, 37, 64]


def make_inputs(seed=0, dtype=torch.float64, lowrank=True, conf=True, invalid=True):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    valid = torch.ones(N, K, dtype=torch.bool)
    if invalid:
        valid[1, 2:] = False  # supervised prefix of 2
        valid[2, :] = False  # nothing supervised
    labels = torch.randint(0, V, (N, K), generator=g)
    labels[~valid] = -100  # garbage the loss must never look at
    x = dict(
        hidden_NKD=rnd(N, K, D).requires_grad_(),
        lm_weight_VD=rnd(V, D),
        target_hidden_NKD=rnd(N, K, D),
        labels_NK=labels,
        valid_NK=valid,
        weights_K=position_weights(K, 2.0),
    )
    if lowrank:
        x["lowrank_NKR"] = rnd(N, K, R).requires_grad_()
        x["lowrank_weight_RV"] = (0.5 * rnd(R, V)).requires_grad_()
    if conf:
        x["conf_logit_NK"] = rnd(N, K).requires_grad_()
    return x


def naive_distill(hidden_NKD, lm_weight_VD, target_hidden_NKD, labels_NK, valid_NK, weights_K,
                  lowrank_NKR=None, lowrank_weight_RV=None, conf_logit_NK=None,
                  alpha_ce=0.1, alpha_tv=0.9, alpha_conf=1.0):
    z = hidden_NKD.double() @ lm_weight_VD.double().T
    if lowrank_NKR is not None:
        z = z + lowrank_NKR.double() @ lowrank_weight_RV.double()
    logp = torch.log_softmax(z, -1)
    p_t = torch.softmax(target_hidden_NKD.double() @ lm_weight_VD.double().T, -1)
    w = weights_K.double() * valid_NK
    ce = -logp.gather(-1, labels_NK.clamp(min=0)[..., None])[..., 0]
    tv = (logp.exp() - p_t).abs().sum(-1)
    accept = 1 - 0.5 * tv
    ce_sum, tv_sum = (w * ce).sum(), (w * tv).sum()
    conf_sum = torch.zeros((), dtype=torch.float64)
    if conf_logit_NK is not None:
        conf_sum = F.binary_cross_entropy_with_logits(
            conf_logit_NK.double(), accept.detach(), weight=w, reduction="sum")
    loss = alpha_ce * ce_sum + alpha_tv * tv_sum + alpha_conf * conf_sum
    correct = (z.argmax(-1) == labels_NK) & valid_NK
    return loss, ce_sum, tv_sum, conf_sum, w.sum(), accept * valid_NK, correct


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


def trainable(x):
    return [t for t in x.values() if isinstance(t, torch.Tensor) and t.requires_grad]


KEEP = [0.0, 1.0]  # keep_probs_mb: recompute logits / keep the probabilities (fits in 1 MiB here)


@pytest.mark.parametrize("keep", KEEP)
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("lowrank,conf,invalid", [(True, True, True), (False, False, True),
                                                  (True, False, False), (False, True, False)])
def test_distill_matches_naive(chunk, lowrank, conf, invalid, keep):
    x = make_inputs(lowrank=lowrank, conf=conf, invalid=invalid)
    out = distill_losses(**x, chunk_size=chunk, keep_probs_mb=keep)
    ref = naive_distill(**x)
    for got, want in zip([out.loss_sum, out.ce_sum, out.tv_sum, out.conf_sum, out.weight_sum,
                          out.accept_NK, out.correct_NK], ref):
        torch.testing.assert_close(got.double() if got.is_floating_point() else got,
                                   want, rtol=1e-5, atol=1e-6)
    assert out.accept_NK[~x["valid_NK"]].eq(0).all() and out.correct_NK[~x["valid_NK"]].eq(0).all()
    params = trainable(x)
    for got, want in zip(grads(out.loss_sum, params), grads(ref[0], params)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("alphas", [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0),
                                    (0.0, 0.0, 0.0), (0.3, 0.7, 0.0)])
@pytest.mark.parametrize("keep", KEEP)
def test_alpha_paths(alphas, keep):
    """Each zero alpha drops its term from loss and gradient; metrics stay computed."""
    a = dict(zip(["alpha_ce", "alpha_tv", "alpha_conf"], alphas))
    x = make_inputs(seed=1)
    out = distill_losses(**x, chunk_size=8, keep_probs_mb=keep, **a)
    ref = naive_distill(**x, **a)
    torch.testing.assert_close(out.loss_sum.double(), ref[0])
    torch.testing.assert_close(out.tv_sum.double(), ref[2])  # logged even when alpha_tv = 0
    params = trainable(x)
    for got, want in zip(grads(out.loss_sum, params), grads(ref[0], params)):
        if want is None or not want.any():
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("keep", KEEP)
def test_gradcheck_tiny(keep):
    """Finite differences of CE + TV. (The confidence term is left out: its target c* is
    detached on purpose, so finite differences through c* would disagree by design.)"""
    x = make_inputs(seed=2, conf=False)
    names = ["hidden_NKD", "lowrank_NKR", "lowrank_weight_RV"]

    def f(*ts):
        return distill_losses(**{**x, **dict(zip(names, ts))}, chunk_size=8, keep_probs_mb=keep).loss_sum

    assert torch.autograd.gradcheck(f, [x[n] for n in names])


def test_bf16_inputs_accumulate_in_fp32():
    x64 = make_inputs(seed=3)
    xb = {k: (v.detach().to(torch.bfloat16).requires_grad_(v.requires_grad)
              if v.is_floating_point() and k != "weights_K" else v) for k, v in x64.items()}
    out = distill_losses(**xb, chunk_size=8)
    ref = naive_distill(**{k: (v.detach().double().requires_grad_(v.requires_grad)
                               if v.is_floating_point() else v) for k, v in xb.items()})
    assert out.loss_sum.dtype == torch.float32
    torch.testing.assert_close(out.loss_sum.double(), ref[0], rtol=1e-5, atol=1e-5)
    (g,) = grads(out.loss_sum, [xb["hidden_NKD"]])
    assert g.dtype == torch.bfloat16


class CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm)
        return func(*args, **(kwargs or {}))


def test_keep_mode_only_when_the_rows_fit():
    """Keeping skips the logit recomputes (fewer matmuls) only when 2*M*V*8 bytes (float64) fit
    in the budget; values and gradients are the same either way."""
    x = make_inputs(seed=5, invalid=False, lowrank=False)  # M = 12 rows: 2*12*37*8 = 7104 bytes
    counts, results = {}, {}
    for name, mb in (("none", 0.0), ("small", 7000 / 2**20), ("fits", 7104 / 2**20)):
        with CountMatmuls() as c:
            out = distill_losses(**x, chunk_size=16, keep_probs_mb=mb)
            g = grads(out.loss_sum, [x["hidden_NKD"]])[0]
        counts[name], results[name] = c.n, (out.loss_sum, g)
    assert counts["small"] == counts["none"] > counts["fits"]
    for name in ("small", "fits"):
        torch.testing.assert_close(results[name], results["none"])


def test_no_full_vocab_tensor_is_created():
    """With chunk < V no op (forward or backward) outputs anything as large as [M, V]."""
    x = make_inputs(seed=4, invalid=False)  # M = N*K = 12 rows; M*V = 444 > V*D, R*V
    sizes = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    sizes.append(t.numel())
            return out

    with Watch():
        out = distill_losses(**x, chunk_size=8)
        out.loss_sum.backward()
    assert max(sizes) < N * K * V // 2, max(sizes)
    assert max(sizes) >= N * K * 8  # the watcher did see the [M, chunk] blocks


def test_errors_name_the_input():
    x = make_inputs()
    x["lm_weight_VD"].requires_grad_()
    with pytest.raises(ValueError, match="lm_weight_VD"):
        distill_losses(**x)
    x = make_inputs()
    x["labels_NK"][0, 0] = V
    with pytest.raises(ValueError, match="labels_NK"):
        distill_losses(**x)
    x = make_inputs()
    with pytest.raises(ValueError, match="weights_K"):
        distill_losses(**{**x, "weights_K": torch.ones(K + 1)})


def test_position_weights():
    torch.testing.assert_close(position_weights(3, 4.0),
                               torch.tensor([1.0, 0.7788008, 0.6065307]))
    torch.testing.assert_close(position_weights(7, None)[-1], torch.exp(torch.tensor(-6 / 7)))
    with pytest.raises(ValueError):
        position_weights(3, 0.0)


def test_simulated_tau_hand_cases():
    a = torch.tensor([[0.5, 0.5, 0.5], [1.0, 0.9, 0.8], [0.3, 0.2, 0.1], [1.0, 1.0, 1.0]])
    v = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    # prefix stops at the first invalid position: row 1 counts only a_1 = 1.0
    torch.testing.assert_close(block_tau(a, v), torch.tensor([1.875, 2.0, 1.0, 4.0]))
    torch.testing.assert_close(simulated_tau(a, v), torch.tensor((1.875 + 2.0 + 4.0) / 3))
    assert simulated_tau(a, torch.zeros_like(v)).isnan()


def naive_soft_ce(hidden_NKD, draft_lm_weight_vD, target_hidden_NKD, target_lm_weight_VD,
                  valid_NK, weights_K, draft_to_target_v=None):
    z = hidden_NKD.double() @ draft_lm_weight_vD.double().T
    t = target_hidden_NKD.double() @ target_lm_weight_VD.double().T
    if draft_to_target_v is not None:
        t = t[..., draft_to_target_v]
    q, logp = torch.softmax(t, -1), torch.log_softmax(z, -1)
    w = weights_K.double() * valid_NK
    loss = (w * -(q * logp).sum(-1)).sum()
    accept = (1 - 0.5 * (logp.exp() - q).abs().sum(-1)) * valid_NK
    return loss, w.sum(), accept, (z.argmax(-1) == t.argmax(-1)) & valid_NK


@pytest.mark.parametrize("chunk", [1, 5, 16, 100])
@pytest.mark.parametrize("pruned", [False, True])
def test_eagle_soft_ce_matches_naive(chunk, pruned):
    g = torch.Generator().manual_seed(5)
    x = make_inputs(seed=5)
    v = 23 if pruned else V
    d2t = torch.randperm(V, generator=g)[:v].sort().values if pruned else None
    args = dict(hidden_NKD=x["hidden_NKD"],
                draft_lm_weight_vD=x["lm_weight_VD"][d2t] if pruned else x["lm_weight_VD"],
                target_hidden_NKD=x["target_hidden_NKD"], target_lm_weight_VD=x["lm_weight_VD"],
                valid_NK=x["valid_NK"], weights_K=0.8 ** torch.arange(K, dtype=torch.float64),
                draft_to_target_v=d2t)
    got = eagle_soft_ce(**args, chunk_size=chunk)
    want = naive_soft_ce(**args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double() if a.is_floating_point() else a, b)
    (ga,) = grads(got[0], [x["hidden_NKD"]])
    (gb,) = grads(want[0], [x["hidden_NKD"]])
    torch.testing.assert_close(ga, gb)


def test_eagle_soft_ce_rejects_bad_map():
    x = make_inputs()
    with pytest.raises(ValueError, match="draft_to_target_v"):
        eagle_soft_ce(x["hidden_NKD"], x["lm_weight_VD"][:5], x["target_hidden_NKD"],
                      x["lm_weight_VD"], x["valid_NK"], torch.ones(K),
                      draft_to_target_v=torch.tensor([0, 1, 2, 3, V]))


@pytest.mark.slow
def test_compiled_chunks_match_eager():
    """compile_chunks=True (torch.compile of the per-chunk work) gives the eager result."""
    x = make_inputs(seed=6, dtype=torch.float32)
    eager = distill_losses(**x, chunk_size=16)
    fused = distill_losses(**x, chunk_size=16, compile_chunks=True)
    torch.testing.assert_close(fused.loss_sum, eager.loss_sum)
    torch.testing.assert_close(fused.accept_NK, eager.accept_NK)
    params = trainable(x)
    for a, b in zip(grads(fused.loss_sum, params), grads(eager.loss_sum, params)):
        torch.testing.assert_close(a, b)
