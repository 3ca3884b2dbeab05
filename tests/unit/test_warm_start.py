"""Warm start from the target and bf16 autocast training (deepspec/training/warm_start.py, loop.py).

Protects: `trainer.warm_start=target` copies the target's top layers into the drafter's layers
in order (attention incl. the K/V projections that also project the context, MLP, norms) and
the final norm, leaves what the target lacks (q/k norms) at its init and says so, refuses bad
settings; a bf16-autocast training step keeps fp32 weights and gradients and a loss close to
the fp32 step's.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from deepspec.drafters import DrafterSpec, build_drafter
from deepspec.training.warm_start import apply_warm_start, top_layers_of, warm_start_from_target


@pytest.mark.parametrize("kind", ["dspark", "dflash"])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_drafter_layers_become_the_target_top_layers(tiny_target, kind, qk_norm):
    target = tiny_target("llama")
    torch.manual_seed(0)
    shapes = dataclasses.replace(target.shapes, qk_norm=qk_norm)
    spec = DrafterSpec(kind=kind, num_layers=2, markov_rank=8, mask_token_id=255, anchors_per_seq=6,
                       head="markov" if kind == "dspark" else "none")
    drafter = build_drafter(spec, shapes)
    before = copy.deepcopy(drafter.state_dict())
    report = apply_warm_start(drafter, target, "target")
    layers, norm = top_layers_of(target)
    L = len(layers)
    assert report["target_layers"] == [L - 2, L - 1]
    for i, theirs in enumerate(layers[L - 2:]):
        mine = drafter.layers[i]
        for name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                     "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                     "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"):
            assert torch.equal(mine.get_parameter(name), theirs.get_parameter(name)), (i, name)
    assert torch.equal(drafter.norm.weight, norm.weight)
    assert ("layers.0.self_attn.q_norm.weight" in report["kept_random"]) == qk_norm
    for name in report["kept_random"]:  # untouched
        assert torch.equal(drafter.state_dict()[name], before[name])
    assert torch.equal(drafter.fuse.fc.weight, before["fuse.fc.weight"])  # not a decoder layer


def test_bad_settings_are_refused(tiny_target):
    target = tiny_target("llama")
    drafter = build_drafter(DrafterSpec(kind="dflash", num_layers=2, mask_token_id=255), target.shapes)
    with pytest.raises(ValueError, match="trainer.warm_start='top'"):
        apply_warm_start(drafter, target, "top")
    assert apply_warm_start(drafter, target, "none") is None
    layers, _ = top_layers_of(target)
    with pytest.raises(ValueError, match="the target only 1"):
        warm_start_from_target(drafter, layers[:1])
    with pytest.raises(ValueError, match="shares no parameter"):
        warm_start_from_target(drafter, torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)]))


def test_bf16_autocast_step_keeps_fp32_master_weights(tiny_target):
    from deepspec.training.loop import DraftLoss, LossParts, autocast, loss_weights, make_batch
    from deepspec.training.synthetic import TargetGeneratedSource

    target = tiny_target("llama")
    torch.manual_seed(0)
    spec = DrafterSpec(kind="dspark", num_layers=2, markov_rank=8, mask_token_id=255, anchors_per_seq=6)
    drafter = build_drafter(spec, target.shapes)
    drafter.attach_target(target.embed_tokens, target.lm_head_weight)
    seqs = TargetGeneratedSource(target, drafter.spec.layer_ids, 3, answer_len=10).get_batch([0, 1, 2])
    batch = make_batch(seqs, drafter.spec, seed=0, device=torch.device("cpu"), dtype=torch.float32)
    model = DraftLoss(drafter, target.lm_head_weight, loss_weights(drafter.spec, None), 0.1, 0.9, 1.0, 64)
    losses, grads = [], []
    for dtype in (None, torch.bfloat16):
        model.zero_grad()
        with autocast(torch.device("cpu"), dtype):
            parts = LossParts(*model(batch))
        parts.loss_sum.backward()
        losses.append(float(parts.loss_sum.detach()))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert grads[1].dtype == torch.float32 and torch.isfinite(grads[1]).all()
    assert losses[1] == pytest.approx(losses[0], rel=0.05)
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert cos > 0.95


def test_cpu_half_products_only_inside_their_context():
    from deepspec.losses import cpu_half_products, distill_losses

    g = torch.Generator().manual_seed(0)
    N, K, D, V = 3, 4, 16, 300
    h = (torch.randn(N, K, D, generator=g) * 3).bfloat16().requires_grad_(True)
    w = torch.randn(V, D, generator=g).bfloat16()
    th = (torch.randn(N, K, D, generator=g) * 3).bfloat16()
    labels = torch.randint(0, V, (N, K), generator=g)
    valid = torch.ones(N, K, dtype=torch.bool)

    def loss_and_grad(half: bool):
        h.grad = None
        with cpu_half_products(half):
            loss = distill_losses(h, w, th, labels, valid, torch.ones(K), chunk_size=64,
                                  keep_probs_mb=0).loss_sum
        loss.backward()  # outside the context: backward follows the forward's setting
        return float(loss.detach()), h.grad.float().clone()

    exact, g_exact = loss_and_grad(False)
    assert loss_and_grad(False)[0] == exact
    fast, g_fast = loss_and_grad(True)
    assert fast != exact and fast == pytest.approx(exact, rel=2e-2)  # bf16-rounded logits
    assert torch.nn.functional.cosine_similarity(g_fast.flatten(), g_exact.flatten(), dim=0) > 0.99


def test_config_choices_match_the_library_checks():
    from data_tools.hf_engine import DTYPES
    from deepspec.choices import RegenDtype, WarmStart
    from deepspec.training.warm_start import MODES

    assert set(WarmStart) == set(MODES)
    assert set(RegenDtype) == {"auto", *DTYPES}
