"""The `mtp` baseline: a V4 target's MTP module as a one-token drafter.

What is protected: the incremental drafter (hooked streams, left-padding of the prefill, its K=V
cache, the sliding window and the attention sink) gives the same logits as the module run over the
whole sequence at once; speculative decoding with it is lossless; checkpoint tensors in V4's mtp.0
names land in the right parameters; non-V4 targets are refused."""

from __future__ import annotations

import pytest
import torch

from deepspec.decoding.engine import generate_speculative, generate_target_only
from deepspec.decoding.sampling import SamplingParams
from deepspec.eval.mtp import V4MTPDrafter, load_mtp_drafter


@pytest.fixture(scope="module")
def v4(tiny_target):
    target = tiny_target("deepseek_v4", sliding_window=4)
    target.source = "random:deepseek_v4"
    drafter = load_mtp_drafter(target)
    with torch.no_grad():  # visible sinks and a non-trivial projection
        drafter.sinks.normal_(std=1.0)
    yield target, drafter
    drafter.close()


def reference_logits(target, drafter: V4MTPDrafter, ids: list[int]) -> torch.Tensor:
    """The module over the whole sequence in one pass: row j predicts ids[j+1] from H_{j-1} and ids[j]."""
    T = len(ids)
    target.forward(torch.tensor([ids]), [target.num_layers - 1])  # the hook captures the streams
    H = drafter._streams[0]  # [T, hc, D]
    x = drafter.mtp_input(H[:-1], torch.tensor(ids[1:]))[None]  # positions 1..T-1
    pos = torch.arange(1, T)[None]
    W = drafter.window

    def attend(q, k, v, ctx_k, ctx_v):  # causal sliding window over the block itself, with the sink
        s = torch.einsum("bqhd,bkd->bhqk", q.float(), k[:, :, 0].float()) * q.shape[-1] ** -0.5
        qi, ki = torch.arange(T - 1)[:, None], torch.arange(T - 1)[None]
        s = s.masked_fill(~((ki <= qi) & (qi - ki < W)), float("-inf"))
        sink = drafter.sinks.float()[None, :, None, None].expand(*s.shape[:3], 1)
        p = torch.cat([s, sink], -1).softmax(-1)[..., :-1]
        return (p @ v[:, :, 0].float()[:, None]).transpose(1, 2).to(q.dtype)

    empty = torch.zeros(1, 0, 1, x.shape[-1])
    y = drafter.block(x, pos, empty, empty, attend)
    return target.logits(drafter.norm(drafter.hc_head(y))[0])


def test_incremental_drafts_equal_the_whole_sequence_pass(v4):
    from deepspec.decoding.target_runner import TargetSession

    target, drafter = v4
    prompts = [[5, 9, 17, 3, 44, 8, 21], [7, 30, 2, 11]]  # different lengths: the prefill is left-padded
    for prompt in prompts:
        session = TargetSession(target, drafter.spec.layer_ids)
        out = session.prefill([prompt])
        state = drafter.new_state(1, 64, "cpu")
        state.extend(out.taps_BTMD, torch.tensor([len(prompt)]), torch.tensor([prompt]))
        anchor = int(target.logits(out.final_BTD[0, -1]).argmax())
        p = drafter.propose(state, torch.tensor([anchor]), torch.tensor([len(prompt)]), with_probs=True)
        ref = reference_logits(target, drafter, prompt + [anchor])
        assert int(p.tokens_BK[0, 0]) == int(ref[-1].argmax())
        torch.testing.assert_close(p.draft_probs_BKV[0, 0], ref[-1].float().softmax(-1), atol=1e-5, rtol=1e-4)
        # one more round: the target reads [anchor, draft], commits the anchor only
        step = session.step(torch.tensor([[anchor, int(p.tokens_BK[0, 0])]]))
        session.commit(torch.tensor([1]))
        state.extend(step.taps_BTMD, torch.tensor([1]), torch.tensor([[anchor, int(p.tokens_BK[0, 0])]]))
        nxt = int(target.logits(step.final_BTD[0, 0]).argmax())
        p2 = drafter.propose(state, torch.tensor([nxt]), torch.tensor([len(prompt) + 1]), with_probs=True)
        ref2 = reference_logits(target, drafter, prompt + [anchor, nxt])
        torch.testing.assert_close(p2.draft_probs_BKV[0, 0], ref2[-1].float().softmax(-1), atol=1e-5, rtol=1e-4)


def test_speculative_decoding_with_mtp_is_lossless(v4):
    target, drafter = v4
    prompt = [[3, 14, 15, 92, 65, 35, 89, 79]]
    base = generate_target_only(target, prompt, 12, SamplingParams(), [0])
    spec = generate_speculative(target, drafter, prompt, 12, SamplingParams(), [0])
    assert spec.tokens == base.tokens
    assert all(n == 1 for n in spec.rounds.proposed)  # MTP-1: one draft per round


def test_checkpoint_names_map_onto_the_module(v4, tmp_path):
    from safetensors.torch import save_file

    from deepspec.eval.mtp import _load_checkpoint_mtp
    from deepspec.export.v4 import LAYER_NAMES

    target, drafter = v4
    sd = drafter.state_dict()
    ckpt = {f"mtp.0.{k}": sd[k] for k in ("enorm.weight", "hnorm.weight", "e_proj.weight", "h_proj.weight",
                                          "norm.weight")}
    ckpt.update({"mtp.0.hc_head_fn": sd["hc_head.hc_fn"], "mtp.0.hc_head_base": sd["hc_head.hc_base"],
                 "mtp.0.hc_head_scale": sd["hc_head.hc_scale"], "mtp.0.attn.attn_sink": sd["sinks"]})
    ckpt.update({f"mtp.0.{theirs}": sd[f"block.{ours}"] for ours, theirs in LAYER_NAMES.items()})
    gate_up, down = sd["block.mlp.experts.gate_up_proj"], sd["block.mlp.experts.down_proj"]
    inter = gate_up.shape[1] // 2
    for e in range(gate_up.shape[0]):
        ckpt[f"mtp.0.ffn.experts.{e}.w1.weight"] = gate_up[e, :inter]
        ckpt[f"mtp.0.ffn.experts.{e}.w3.weight"] = gate_up[e, inter:]
        ckpt[f"mtp.0.ffn.experts.{e}.w2.weight"] = down[e]
    save_file({k: v.contiguous() for k, v in ckpt.items()}, str(tmp_path / "model.safetensors"))
    fresh = V4MTPDrafter(target)
    try:
        _load_checkpoint_mtp(fresh, tmp_path, target.name)
        for k, v in fresh.state_dict().items():
            assert torch.equal(v, sd[k].to(v.dtype)), k
    finally:
        fresh.close()
    (tmp_path / "model.safetensors").unlink()
    save_file({"mtp.0.main_proj.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="no V4 MTP module"):
        _load_checkpoint_mtp(V4MTPDrafter(target), tmp_path, target.name)


def test_non_v4_targets_are_refused(tiny_target):
    with pytest.raises(ValueError, match="DeepSeek-V4"):
        V4MTPDrafter(tiny_target("llama"))
