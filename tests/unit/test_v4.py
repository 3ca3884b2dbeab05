"""V4-style DSpark drafter: the layer is transformers' V4 block, no leakage across the anchor,
training forward == inference propose, full-size Flash / Pro parameter counts, the `mtp.*` export
round trip, the V4 final-layer tap, and the capacity-plan arithmetic."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from transformers import DeepseekV4Config
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf_v4

from deepspec.drafters import DrafterSpec, build_drafter, resolve_spec
from deepspec.drafters.layers import BACKBONES, LayerDims
from deepspec.drafters.packing import SequenceFeatures, pack_blocks
from deepspec.drafters.v4 import V4DraftLayer, V4DSparkDrafter, v4_config
from deepspec.export.v4 import NO_SINK, export_v4, import_v4
from deepspec.plan import cache_bytes_per_token, capacity_plan, model_state_bytes
from deepspec.targets.shapes import shapes_from_hf_config
from tests.tiny import tiny_target as make_tiny_target

K = 5
TAPS = [2, 3, 4]
TINY_BACKBONE = dict(n_routed_experts=4, num_experts_per_tok=2, q_lora_rank=16, o_lora_rank=16, o_groups=2,
                     qk_rope_head_dim=8)


@pytest.fixture(scope="module")
def target():
    return make_tiny_target("deepseek_v4")


def make(target, kind="dspark", head="markov", conf=True, seed=1, window=None):
    spec = DrafterSpec(kind=kind, backbone="v4", num_layers=2, block_size=K, mask_token_id=255, head=head,
                       markov_rank=8, confidence_head=conf, layer_ids=TAPS, sliding_window=window,
                       backbone_config=TINY_BACKBONE)
    torch.manual_seed(seed)
    drafter = build_drafter(spec, target.shapes)
    if drafter.head is not None:  # W2 starts at zero; make the Markov bias visible
        torch.nn.init.normal_(drafter.head.w2, std=0.5)
    drafter.attach_target(target.embed_tokens, target.lm_head_weight)
    return drafter


def features(target, lengths=(14, 11), seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for T in lengths:
        ids = torch.randint(0, 250, (T,), generator=g)
        out = target.forward(ids[None], TAPS)
        lm = torch.ones(T, dtype=torch.bool)
        lm[:2] = False
        seqs.append(SequenceFeatures(ids, lm, out.taps_BTMD[0], out.final_BTD[0]))
    return seqs


def batch_for(target, drafter, anchors=3, seed=0):
    seqs = features(target, seed=seed)
    return seqs, pack_blocks(seqs, K, anchors, 255, generator=torch.Generator().manual_seed(seed))


def full_logits(target, out):
    """Training logits as the loss forms them: post-norm hidden @ LM head + Markov bias."""
    logits = out.hidden_NKD @ target.lm_head_weight.T
    if out.lowrank_NKR is not None:
        logits = logits + out.lowrank_NKR @ out.lowrank_weight_RV
    return logits


def test_v4_layer_is_transformers_v4_decoder_block():
    """With plain causal self-attention as `attend`, a V4DraftLayer equals transformers'
    DeepseekV4DecoderLayer (sliding attention, sinks at -inf) carrying the same weights."""
    torch.manual_seed(0)
    dims = LayerDims(hidden_size=32, num_heads=4, num_kv_heads=1, head_dim=16, intermediate_size=16,
                     sliding_window=64)
    cfg = v4_config(dims, 1, TINY_BACKBONE, vocab_size=64)
    ours = V4DraftLayer(dims, 0, cfg)
    from deepspec.drafters.v4 import init_v4_weights
    init_v4_weights(ours, std=0.2)
    cfg._attn_implementation = "eager"
    ref = hf_v4.DeepseekV4DecoderLayer(cfg, 0)
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)
    assert missing == ["self_attn.sinks"] and not unexpected
    ref.self_attn.sinks.data.fill_(NO_SINK)
    S = 7
    x = torch.randn(1, S, cfg.hc_mult, 32)
    pos = torch.arange(S)[None]
    causal = torch.full((S, S), float("-inf")).triu(1)[None, None]
    rope = hf_v4.DeepseekV4RotaryEmbedding(cfg)
    emb = {"main": rope(x, pos, layer_type="main"), "compress": rope(x, pos, layer_type="compress")}
    want = ref(x, position_embeddings=emb, position_ids=pos, attention_mask=causal)

    def attend(q, k, v, ctx_k, ctx_v):
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True).transpose(1, 2)

    got = ours(x, pos, None, None, attend)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_registered_and_built_through_build_drafter(target):
    assert BACKBONES["v4"] is V4DraftLayer
    drafter = make(target)
    assert isinstance(drafter, V4DSparkDrafter) and drafter.confidence.proj.bias is None
    assert len(drafter.layers) == 2 and drafter.v4_config.hc_mult == target.shapes.num_streams == 4


def test_forward_backward_every_parameter_trains_target_weights_stay_out(target):
    drafter = make(target)
    _, batch = batch_for(target, drafter)
    names = set(dict(drafter.named_parameters())) | set(drafter.state_dict())
    assert not any("embed_tokens" in n or "lm_head" in n for n in names)
    out = drafter(batch)
    assert out.hidden_NKD.shape == (batch.num_blocks, K, 32)
    (full_logits(target, out).logsumexp(-1).sum() + out.conf_logit_NK.sum()).backward()
    no_grad = [n for n, p in drafter.named_parameters() if p.grad is None]
    assert not no_grad, f"no gradient reached {no_grad}"
    assert target.embed_tokens.weight.grad is None and target.lm_head_weight.grad is None


@pytest.mark.parametrize("window", [None, 4])
def test_no_leakage_from_context_at_or_after_the_anchor(target, window):
    drafter = make(target, window=window)
    _, batch = batch_for(target, drafter)
    ref = drafter(batch)
    ref_all = torch.cat([full_logits(target, ref), ref.conf_logit_NK[..., None]], -1)
    n = 1
    a = int(batch.anchor_pos_N[n])
    seq0 = batch.ctx_seq_C == 0
    b = dataclasses.replace(batch, ctx_taps_CMD=batch.ctx_taps_CMD.clone())
    b.ctx_taps_CMD[seq0 & (batch.ctx_pos_C >= a)] += 5.0
    out = drafter(b)
    assert torch.equal(torch.cat([full_logits(target, out), out.conf_logit_NK[..., None]], -1)[n], ref_all[n])
    b.ctx_taps_CMD[seq0 & (batch.ctx_pos_C == a - 1)] += 5.0  # the position just before the anchor does reach it
    assert not torch.allclose(full_logits(target, drafter(b))[n], full_logits(target, ref)[n])


@pytest.mark.parametrize("kind,head", [("dspark", "markov"), ("dflash", "none")])
def test_training_forward_equals_inference_propose(target, kind, head):
    drafter = make(target, kind=kind, head=head, conf=kind == "dspark", window=6)
    seqs, batch = batch_for(target, drafter)
    out = drafter(batch)
    probs = full_logits(target, out).float().softmax(-1)
    for n in range(batch.num_blocks):
        s, a = int(batch.block_seq_N[n]), int(batch.anchor_pos_N[n])
        state = drafter.new_state(batch_size=1, max_len=32)
        state.extend(seqs[s].taps_TMD[None, :a + 2], torch.tensor([a]))  # rows past `a` are padding
        prop = drafter.propose(state, batch.block_ids_NK[n, :1], torch.tensor([a]), greedy=True,
                               forced_tokens_BK=batch.labels_NK[n:n + 1])
        torch.testing.assert_close(prop.draft_probs_BKV[0], probs[n], atol=1e-5, rtol=1e-4)
        if out.conf_logit_NK is not None:
            torch.testing.assert_close(prop.conf_BK[0], torch.sigmoid(out.conf_logit_NK[n]), atol=1e-5, rtol=1e-4)


FLASH = DeepseekV4Config()
PRO = DeepseekV4Config(hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, n_routed_experts=384,
                       moe_intermediate_size=3072, q_lora_rank=1536, o_groups=16)


@pytest.mark.parametrize("config,taps,backbone,expected", [
    (FLASH, [40, 41, 42], dict(q_lora_rank=1024, o_groups=8), 19_845_850_023),
    (PRO, [58, 59, 60], dict(n_routed_experts=384, moe_intermediate_size=3072, q_lora_rank=1536, o_groups=16),
     77_432_214_951),
])
def test_full_size_flash_and_pro_drafters_on_the_meta_device(config, taps, backbone, expected):
    shapes = shapes_from_hf_config(config)
    spec = DrafterSpec(kind="dspark", backbone="v4", num_layers=3, block_size=5, mask_token_id=128799,
                       layer_ids=taps, sliding_window=128, backbone_config=backbone)
    with torch.device("meta"):
        drafter = build_drafter(spec, shapes)
    n = sum(p.numel() for p in drafter.parameters())
    D, inter, E = config.hidden_size, config.moe_intermediate_size, config.n_routed_experts
    routed = 3 * E * 3 * D * inter  # 3 layers x experts x (gate, up, down)
    assert sum(p.numel() for name, p in drafter.named_parameters() if ".mlp.experts." in name) == routed
    assert drafter.fuse.fc.weight.shape == (D, 3 * D) and drafter.head.w1.weight.shape == (129280, 256)
    assert n == expected, f"{n:,} parameters"


def test_v4_targets_may_tap_their_final_layer_others_may_not():
    v4 = shapes_from_hf_config(FLASH)
    spec = DrafterSpec(kind="dspark", mask_token_id=128799, layer_ids=[40, 41, 42])
    assert resolve_spec(spec, v4).layer_ids == [40, 41, 42]
    llama = dataclasses.replace(v4, model_type="llama", num_streams=1)
    with pytest.raises(ValueError, match="never tap"):
        resolve_spec(spec, llama)


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
def test_expert_kernels_give_the_eager_numbers(target, impl):
    drafter = make(target)
    _, batch = batch_for(target, drafter)
    ref = full_logits(target, drafter(batch))
    drafter.v4_config._experts_implementation = impl  # shared by every layer's MoE block
    torch.testing.assert_close(full_logits(target, drafter(batch)), ref, atol=1e-5, rtol=1e-5)


def test_backbone_config_rejects_keys_deepspec_owns_and_typos():
    dims = LayerDims(hidden_size=32, num_heads=4, num_kv_heads=1, head_dim=16, intermediate_size=16)
    with pytest.raises(ValueError, match="hidden_size"):
        v4_config(dims, 1, {"hidden_size": 64})
    with pytest.raises(ValueError, match="n_routed_expert"):
        v4_config(dims, 1, {"n_routed_expert": 4})
    with pytest.raises(ValueError, match="experts_implementation"):
        v4_config(dims, 1, {"experts_implementation": "fast"})


def test_export_import_round_trip_gives_identical_outputs(target, tmp_path):
    drafter = make(target)
    _, batch = batch_for(target, drafter)
    info = export_v4(drafter, tmp_path, dtype=torch.float32)
    back, notes = import_v4(tmp_path)
    back.attach_target(target.embed_tokens, target.lm_head_weight)
    assert notes == [] and back.spec == drafter.spec
    a, b = drafter(batch), back(batch)
    assert torch.equal(full_logits(target, a), full_logits(target, b))
    assert torch.equal(a.conf_logit_NK, b.conf_logit_NK)
    with safe_open(str(tmp_path / "mtp.safetensors"), "pt") as f:
        keys = set(f.keys())
        w2 = f.get_tensor("mtp.1.markov_head.markov_w2.weight")
        w1 = f.get_tensor("mtp.0.ffn.experts.3.w1.weight")
        sink = f.get_tensor("mtp.1.attn.attn_sink")
    assert info["tensors"] == len(keys)
    assert {"mtp.0.main_proj.weight", "mtp.0.main_norm.weight", "mtp.1.hc_head_fn", "mtp.1.norm.weight",
            "mtp.1.markov_head.markov_w1.weight", "mtp.1.confidence_head.proj.weight", "mtp.0.hc_attn_fn",
            "mtp.1.ffn.gate.bias", "mtp.0.ffn.shared_experts.w2.weight"} <= keys
    assert not any(k.startswith("mtp.0.markov") or k.startswith("mtp.1.main_proj") for k in keys)
    torch.testing.assert_close(w2, drafter.head.w2.detach().T)  # [V, r] in the V4 layout
    torch.testing.assert_close(w1, drafter.layers[0].mlp.experts.gate_up_proj.detach()[3, :16])
    assert bool((sink == NO_SINK).all())
    config = json.loads((tmp_path / "dspark_config.json").read_text())
    assert config["dspark_target_layer_ids"] == TAPS and config["dspark_noise_token_id"] == 255
    assert config["n_mtp_layers"] == 2 and config["dspark_block_size"] == K


def test_import_of_a_published_style_checkpoint_uses_its_config(target, tmp_path):
    """A V4 checkpoint dir (config.json + mtp.* shard, sinks set) imports with the sinks reported."""
    drafter = make(target)
    export_v4(drafter, tmp_path, dtype=torch.float32)
    (tmp_path / "deepspec_v4.json").unlink()
    from transformers import AutoConfig

    from tests.tiny import SIZES as TINY
    cfg = AutoConfig.for_model("deepseek_v4", **TINY["deepseek_v4"]).to_dict()
    cfg.update(json.loads((tmp_path / "dspark_config.json").read_text()))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file
    state = load_file(str(tmp_path / "mtp.safetensors"))
    state["mtp.0.attn.attn_sink"] = torch.zeros_like(state["mtp.0.attn.attn_sink"])
    save_file(state, str(tmp_path / "mtp.safetensors"))
    back, notes = import_v4(tmp_path)
    assert back.spec.layer_ids == TAPS and back.spec.num_layers == 2 and back.spec.markov_rank == 8
    assert any("sinks dropped" in n for n in notes)
    for (k, v), (k2, v2) in zip(sorted(drafter.state_dict().items()), sorted(back.state_dict().items()), strict=True):
        assert k == k2 and torch.equal(v, v2), k


def test_capacity_plan_arithmetic():
    assert cache_bytes_per_token(2560, 5, "bf16") == 5 + 2 * 2560 * 6  # DeepSpec's: 6 + 2·d·(m+1)
    assert cache_bytes_per_token(4096, 3, "fp8") == 5 + 3 * 4096 + 2 * 4096 + 3 * 4  # fp8 taps, bf16 final
    P, W = 1000, 8
    assert [model_state_bytes(P, s, W) for s in range(4)] == [16000, 4000 + 1500, 2000 + 1750, 2000]
    tiny = dict(vocab_size=256, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=6,
                num_attention_heads=4, num_key_value_heads=1, head_dim=16, q_lora_rank=16, n_routed_experts=4,
                num_experts_per_tok=2, o_lora_rank=16, o_groups=2, qk_rope_head_dim=8)
    spec = DrafterSpec(kind="dspark", backbone="v4", num_layers=2, block_size=5, mask_token_id=255,
                       layer_ids=TAPS, markov_rank=8, backbone_config=TINY_BACKBONE)
    plan = capacity_plan(spec, DeepseekV4Config(**tiny), nodes=2, gpus_per_node=2, gpu_memory_gib=1.0,
                         tokens=10_000, micro_batch=2, seq_len=64, vocab_chunk=128, features="online",
                         target_dtype="bf16", epochs=1.0)
    with torch.device("meta"):
        n = sum(p.numel() for p in build_drafter(spec, shapes_from_hf_config(DeepseekV4Config(**tiny))).parameters())
    assert plan["drafter_params"] == n
    totals = [plan["bytes_per_gpu"][f"zero{s}"] for s in range(4)]
    assert totals == sorted(totals, reverse=True) and totals[0] > totals[3]
    assert plan["cache_tb"]["bf16"] == pytest.approx(plan["cache_bytes_per_token"]["bf16"] * 10_000 / 1e12)
    shard = plan["online_target_shard_bytes"]
    assert shard["bf16"] == 2 * plan["target"]["params"] // 2 and shard["fp8"] == plan["target"]["params"] // 2


def test_recipes_compose():
    from deepspec.config import compose, section

    for name, taps in (("dspark_v4_flash", [40, 41, 42]), ("dspark_v4_pro", [58, 59, 60])):
        cfg = compose([f"recipe={name}"])
        spec = section(cfg, "drafter")
        assert spec.backbone == "v4" and spec.block_size == 5 and spec.mask_token_id == 128799
        assert spec.layer_ids == taps and cfg.deepspeed.zero_stage == 3
        assert list(cfg.deepspeed.leaf_modules) == ["DeepseekV4SparseMoeBlock"]
    pro = compose(["recipe=dspark_v4_pro"])
    assert pro.drafter.backbone_config.n_routed_experts == 384 and pro.target.name.endswith("V4-Pro")


def test_plan_command_on_the_tiny_recipe(tmp_path):
    from deepspec.config import compose
    from deepspec.plan import run

    plan = run(compose(["recipe=dspark_v4_tiny", f"output_dir={tmp_path}"]))
    assert sorted(plan["bytes_per_gpu"]) == ["zero0", "zero1", "zero2", "zero3"]
    assert plan["drafter"]["layer_ids"] == TAPS and plan["features"] == "online"
    assert plan["online_target_shard_bytes"]["bf16"] > 0 and (tmp_path / "plan.json").exists()
    assert set(plan["cache_bytes_per_token"]) == {"fp32", "bf16", "fp16", "fp8"}


def test_published_weights_become_an_init_from_checkpoint(target, tmp_path):
    """V4 layout -> deepspec checkpoint -> the trainer's warm start (init_from) loads it exactly."""
    from deepspec.export.v4 import import_to_checkpoint
    from deepspec.training.checkpoint import load_weights

    drafter = make(target)
    export_v4(drafter, tmp_path / "v4", dtype=torch.float32)
    info = import_to_checkpoint(tmp_path / "v4", tmp_path / "init")
    assert info["notes"] == [] and info["params"] == sum(p.numel() for p in drafter.parameters())
    fresh = make(target, seed=7)
    load_weights(fresh, tmp_path / "init")
    for (k, v), (k2, v2) in zip(sorted(drafter.state_dict().items()), sorted(fresh.state_dict().items()), strict=True):
        assert k == k2 and torch.equal(v, v2), k


FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def test_import_dequantises_fp8_blocks_and_packed_fp4_experts(target, tmp_path):
    """Published V4 shards store experts as packed FP4 (+ue8m0 scale per 32 inputs) and other linears as
    FP8 with 128x128 block scales; weights exactly representable in those formats import exactly."""
    from safetensors.torch import load_file, save_file

    from deepspec.export.v4 import read_mtp_tensors

    drafter = make(target)
    export_v4(drafter, tmp_path, dtype=torch.float32)
    state = load_file(str(tmp_path / "mtp.safetensors"))
    g = torch.Generator().manual_seed(0)
    w1 = state["mtp.0.ffn.experts.1.w1.weight"]  # [16, 32]: one FP4 scale per row and 32 inputs
    codes = torch.randint(0, 16, w1.shape, generator=g)
    exps = torch.randint(120, 130, (w1.shape[0], 1), generator=g, dtype=torch.uint8)
    want_w1 = FP4_VALUES[codes] * (exps.float() - 127).exp2()
    state["mtp.0.ffn.experts.1.w1.weight"] = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)
    state["mtp.0.ffn.experts.1.w1.scale"] = exps
    wkv = state["mtp.1.attn.wkv.weight"]  # [16, 32]: a single 128x128 block
    fp8 = wkv.to(torch.float8_e4m3fn)
    state["mtp.1.attn.wkv.weight"], state["mtp.1.attn.wkv.scale"] = fp8, torch.tensor([[0.25]])
    save_file(state, str(tmp_path / "mtp.safetensors"))
    got = read_mtp_tensors(tmp_path)
    assert "mtp.0.ffn.experts.1.w1.scale" not in got
    torch.testing.assert_close(got["mtp.0.ffn.experts.1.w1.weight"].float(), want_w1, atol=0, rtol=0)
    torch.testing.assert_close(got["mtp.1.attn.wkv.weight"].float(), (fp8.float() * 0.25).bfloat16().float())
    back, _ = import_v4(tmp_path)
    torch.testing.assert_close(back.layers[0].mlp.experts.gate_up_proj.detach()[1, :16], want_w1, atol=0, rtol=0)
    state["mtp.0.attn.wq_a.weight"] = state["mtp.0.attn.wq_a.weight"].to(torch.int8)  # no scale: refused
    save_file(state, str(tmp_path / "mtp.safetensors"))
    with pytest.raises(ValueError, match="wq_a"):
        read_mtp_tensors(tmp_path)


def test_data_estimate_and_plan_read_a_v4_target_config_the_same_way():
    from data_tools.commands import target_shapes
    from deepspec.config import compose

    shapes = target_shapes(compose(["recipe=dspark_v4_flash"]))  # no weights, no hub: the V4-Flash preset
    assert (shapes.model_type, shapes.num_layers, shapes.hidden_size, shapes.num_streams) == \
        ("deepseek_v4", 43, 4096, 4)
