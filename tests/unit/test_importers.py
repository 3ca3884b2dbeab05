"""`deepspec import`: released drafters -> deepspec checkpoints, and back out bit for bit.

Tiny checkpoints are written here in each published layout: a DeepSeek-V4 checkpoint whose DSpark
drafter sits in `mtp.*` with FP8 (e4m3, 128 x 128 block scales) linears and packed-FP4 routed
experts, sharded with an index; a DeepSpec HF drafter (Qwen3DSparkModel config, no deepspec entry);
a speculators-format drafter. Unknown variants are refused naming the tensors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from deepspec.drafters import DrafterSpec, build_drafter
from deepspec.export.importers import detect_layout, import_drafter
from deepspec.export.v4 import export_v4, read_mtp_tensors

FP8_LINEARS = ("attn.wq_a", "attn.wq_b", "attn.wkv", "attn.wo_b", "ffn.shared_experts.w1", "ffn.shared_experts.w2",
               "ffn.shared_experts.w3", "main_proj")


def _fp8(w: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 weights + one float32 scale per 128 x 128 block (random positive scales)."""
    rows, cols = math.ceil(w.shape[0] / 128), math.ceil(w.shape[1] / 128)
    scale = torch.rand(rows, cols, generator=g) * 0.02 + 0.005
    q = (w.float() / scale.repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)[:, : w.shape[1]])
    return q.clamp(-448, 448).to(torch.float8_e4m3fn), scale


def _fp4(w: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two e2m1 codes per byte + one ue8m0 scale byte per 32 inputs (random codes)."""
    codes = torch.randint(0, 16, w.shape, generator=g)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)
    return packed, torch.randint(118, 126, (w.shape[0], w.shape[1] // 32), generator=g, dtype=torch.uint8)


def write_v4_checkpoint(drafter, out: Path, seed: int = 0, extra: dict | None = None) -> Path:
    """A DeepSeek-V4-style checkpoint directory: config.json, two shards (target tensors + mtp.*) and an index."""
    from transformers import AutoConfig

    from deepspec.export.v4 import dspark_config
    from tests.tiny import tiny_config

    tmp = out.parent / (out.name + "_plain")
    export_v4(drafter, tmp, dtype=torch.bfloat16)
    state = load_file(str(tmp / "mtp.safetensors"))
    g = torch.Generator().manual_seed(seed)
    quant: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        stem = name.removesuffix(".weight")
        if name.endswith(".weight") and stem.split(".", 2)[-1] in FP8_LINEARS:
            quant[name], quant[stem + ".scale"] = _fp8(t, g)
        elif ".ffn.experts." in name and t.shape[1] % 32 == 0:  # (w2 of a tiny expert has 16 inputs)
            quant[name], quant[stem + ".scale"] = _fp4(t, g)
        else:
            quant[name] = t
    quant.update(extra or {})
    out.mkdir(parents=True)
    shapes = drafter.shapes
    config = AutoConfig.for_model("deepseek_v4", **tiny_config("deepseek_v4", vocab_size=shapes.vocab_size)).to_dict()
    config.update(dspark_config(drafter))
    (out / "config.json").write_text(json.dumps(config))
    save_file({"embed.weight": torch.zeros(4, shapes.hidden_size, dtype=torch.bfloat16)},
              str(out / "model-00001-of-00002.safetensors"))
    save_file(quant, str(out / "model-00002-of-00002.safetensors"))
    weight_map = {"embed.weight": "model-00001-of-00002.safetensors",
                  **{k: "model-00002-of-00002.safetensors" for k in quant}}
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return out


def tiny_v4_drafter(shapes, seed: int = 1, **spec):
    base = dict(kind="dspark", backbone="v4", num_layers=2, block_size=5, mask_token_id=4, head="markov",
                markov_rank=8, confidence_head=True, layer_ids=[2, 3, 4], sliding_window=8,
                backbone_config=dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                     q_lora_rank=16, o_lora_rank=16, o_groups=2, qk_rope_head_dim=8))
    torch.manual_seed(seed)
    drafter = build_drafter(DrafterSpec(**{**base, **spec}), shapes)
    torch.nn.init.normal_(drafter.head.w2, std=0.5)
    return drafter


@pytest.fixture(scope="module")
def v4_shapes(tiny_target):
    return tiny_target("deepseek_v4").shapes


def test_v4_fp8_checkpoint_imports_and_exports_back_bit_for_bit(v4_shapes, tmp_path):
    src = write_v4_checkpoint(tiny_v4_drafter(v4_shapes), tmp_path / "V4")
    assert detect_layout(src) == "v4"
    info = import_drafter(src, tmp_path / "C")
    assert info["layout"] == "v4" and "V4" in info["variant"] and info["block_size"] == 5
    assert any("FP8" in n and "FP4" in n for n in info["notes"])
    from deepspec.drafters.io import load_drafter

    back = load_drafter(tmp_path / "C")
    export_v4(back, tmp_path / "X", dtype=torch.bfloat16)
    want = read_mtp_tensors(src)  # dequantised
    got = load_file(str(tmp_path / "X" / "mtp.safetensors"))
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def test_unknown_v4_variant_is_refused_naming_the_tensors(v4_shapes, tmp_path):
    extra = {"mtp.1.engram.proj.weight": torch.zeros(4, 4, dtype=torch.bfloat16)}
    src = write_v4_checkpoint(tiny_v4_drafter(v4_shapes), tmp_path / "V4", extra=extra)
    with pytest.raises(ValueError, match=r"mtp\.1\.engram\.proj\.weight"):
        import_drafter(src, tmp_path / "C")
    assert not (tmp_path / "C").exists()


def test_v4_mtp_module_is_recognised_and_refused(tmp_path):
    src = tmp_path / "mtp1"
    src.mkdir()
    save_file({f"mtp.0.{k}": torch.zeros(4, 4) for k in ("e_proj.weight", "h_proj.weight", "enorm.weight")},
              str(src / "model.safetensors"))
    with pytest.raises(ValueError, match="MTP module"):
        import_drafter(src, tmp_path / "C")


def _block_drafter(tiny_target, seed=3):
    target = tiny_target("qwen3")
    spec = DrafterSpec(kind="dspark", num_layers=2, block_size=4, mask_token_id=255, markov_rank=8,
                       layer_ids=[1, 3], qk_norm=True)
    torch.manual_seed(seed)
    drafter = build_drafter(spec, target.shapes)
    torch.nn.init.normal_(drafter.head.w2, std=0.5)
    return drafter


def _foreign_hf(drafter, out: Path) -> tuple[Path, dict, dict]:
    """A DeepSpec HF drafter directory: our vLLM layout without deepspec's own config entry."""
    from deepspec.export.drafter import export_drafter

    export_drafter(drafter, "vllm", out, check=False)
    config = json.loads((out / "config.json").read_text())
    config.pop("deepspec")
    (out / "config.json").write_text(json.dumps(config))
    return out, config, load_file(str(next(out.glob("*.safetensors"))))


def test_deepspec_hf_drafter_round_trips_bit_for_bit(tiny_target, tmp_path):
    from deepspec.drafters.io import load_drafter
    from deepspec.export.drafter import export_drafter

    drafter = _block_drafter(tiny_target)
    src, _, tensors = _foreign_hf(drafter, tmp_path / "hf")
    assert detect_layout(src) == "deepspec-hf"
    info = import_drafter(src, tmp_path / "C")
    assert info["kind"] == "dspark" and info["layer_ids"] == [1, 3]
    back = load_drafter(tmp_path / "C")
    assert back.spec.block_size == 4 and back.spec.markov_rank == 8 and back.spec.mask_token_id == 255
    export_drafter(back, "vllm", tmp_path / "X", check=False)
    again = load_file(str(next((tmp_path / "X").glob("*.safetensors"))))
    assert set(again) == set(tensors)
    for k, v in tensors.items():
        assert again[k].dtype == v.dtype and torch.equal(again[k], v), k


def test_speculators_drafter_imports_to_the_same_weights(tiny_target, tmp_path):
    from deepspec.drafters.io import load_drafter

    drafter = _block_drafter(tiny_target)
    hf, config, tensors = _foreign_hf(drafter, tmp_path / "hf")
    src = tmp_path / "spec"
    src.mkdir()
    layer_keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                  "rms_norm_eps", "rope_parameters", "max_position_embeddings", "vocab_size", "num_hidden_layers",
                  "model_type")
    spec_cfg = {"architectures": ["DSparkDraftModel"], "speculators_model_type": "dspark",
                "aux_hidden_state_layer_ids": [i + 1 for i in config["dflash_config"]["target_layer_ids"]],
                "block_size": 4, "mask_token_id": 255, "markov_rank": 8, "markov_head_type": "vanilla",
                "enable_confidence_head": True, "confidence_head_with_markov": True, "sample_from_anchor": True,
                "transformer_layer_config": {k: config[k] for k in layer_keys}}
    (src / "config.json").write_text(json.dumps(spec_cfg))
    save_file(tensors, str(src / "model.safetensors"))
    assert detect_layout(src) == "speculators"
    import_drafter(src, tmp_path / "C")
    via_hf = tmp_path / "C_hf"
    import_drafter(hf, via_hf)
    a, b = load_drafter(tmp_path / "C").state_dict(), load_drafter(via_hf).state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert load_drafter(tmp_path / "C").spec.layer_ids == [1, 3]


def test_a_foreign_tensor_in_an_hf_drafter_is_named(tiny_target, tmp_path):
    src, _, tensors = _foreign_hf(_block_drafter(tiny_target), tmp_path / "hf")
    save_file({**tensors, "layers.0.mlp.router.weight": torch.zeros(2, 2)}, str(next(src.glob("*.safetensors"))))
    with pytest.raises(ValueError, match="router"):
        import_drafter(src, tmp_path / "C")
