"""DeepSeek-V4 DSpark layout (docs/deepseek_v4.md): export a V4-style drafter as `mtp.*`, import one back.

The published DeepSeek-V4-Flash-DSpark drafter lives inside the target checkpoint, in V4's
original (pre-`transformers`) tensor names. deepspec <-> V4 names, per draft layer i:

    layers.{i}.attn_hc.{fn,base,scale}           mtp.{i}.hc_attn_{fn,base,scale}          (fp32)
    layers.{i}.ffn_hc.{fn,base,scale}            mtp.{i}.hc_ffn_{fn,base,scale}           (fp32)
    layers.{i}.input_layernorm.weight            mtp.{i}.attn_norm.weight
    layers.{i}.post_attention_layernorm.weight   mtp.{i}.ffn_norm.weight
    layers.{i}.self_attn.q_a_proj / q_a_norm / q_b_proj / kv_proj / kv_norm / o_a_proj / o_b_proj
                                                 mtp.{i}.attn.wq_a / q_norm / wq_b / wkv / kv_norm / wo_a / wo_b
    (no attention sink)                          mtp.{i}.attn.attn_sink = -1e30 per head   (fp32)
    layers.{i}.mlp.gate.weight                   mtp.{i}.ffn.gate.weight
    layers.{i}.mlp.gate.e_score_correction_bias  mtp.{i}.ffn.gate.bias                     (fp32)
    layers.{i}.mlp.experts.gate_up_proj[e]       mtp.{i}.ffn.experts.{e}.w1 (gate rows) | w3 (up rows)
    layers.{i}.mlp.experts.down_proj[e]          mtp.{i}.ffn.experts.{e}.w2
    layers.{i}.mlp.shared_experts.{gate,down,up}_proj
                                                 mtp.{i}.ffn.shared_experts.{w1,w2,w3}
and on the first / last stage:
    fuse.fc.weight, fuse.norm.weight             mtp.0.main_proj.weight, mtp.0.main_norm.weight
    norm.{hc_fn,hc_base,hc_scale}                mtp.{L-1}.hc_head_{fn,base,scale}          (fp32)
    final_norm.weight                            mtp.{L-1}.norm.weight
    head.w1.weight [V, r]                        mtp.{L-1}.markov_head.markov_w1.weight [V, r]
    head.w2 [r, V]                               mtp.{L-1}.markov_head.markov_w2.weight [V, r] (transposed)
    confidence.proj.weight [1, D + r]            mtp.{L-1}.confidence_head.proj.weight      (fp32)

Layer ids: `dspark_target_layer_ids` are written as deepspec's own ids ("layer k" = output of
decoder layer k, 0-based, streams averaged), which is the V4 checkpoint's convention: Flash's
published [40, 41, 42] are the outputs of its last three decoder layers (42 = the final layer,
before hc_head and the final norm). No +1 shift here, unlike vLLM's generic DFlash/DSpark ids.

Files written: `mtp.safetensors` (the drafter only), `model.safetensors.index.json` (its
weight map), `dspark_config.json` (the fields to merge into the target's config.json) and
`deepspec_v4.json` (the deepspec spec + target shapes, so `import_v4` rebuilds it exactly).
To serve: copy `mtp.safetensors` into the target checkpoint, add the index entries, merge
`dspark_config.json` into its config.json, then `vllm serve ... --speculative-config
'{"method": "dspark", "num_speculative_tokens": 5}'`.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from deepspec.drafters.spec import DrafterSpec
from deepspec.targets.shapes import TargetShapes

WEIGHTS_FILE = "mtp.safetensors"
DEEPSPEC_FILE = "deepspec_v4.json"
DSPARK_CONFIG_FILE = "dspark_config.json"
NO_SINK = -1e30  # an attention-sink logit that contributes exactly nothing
FP32_KEYS = re.compile(r"(hc_\w+_(fn|base|scale)|hc_head_\w+|attn_sink|gate\.bias|confidence_head\.proj\.\w+)$")
# the deepspec parameters stored as FP32_KEYS: kept in float32 by `import_v4` so a round trip is exact
FP32_PARAMS = re.compile(r"((attn|ffn)_hc\.(fn|base|scale)|mlp\.gate\.e_score_correction_bias|^norm\.hc_\w+|"
                         r"^confidence\.proj\.\w+)$")

# per-layer deepspec suffix -> V4 suffix (everything except the experts)
LAYER_NAMES = {
    "attn_hc.fn": "hc_attn_fn", "attn_hc.base": "hc_attn_base", "attn_hc.scale": "hc_attn_scale",
    "ffn_hc.fn": "hc_ffn_fn", "ffn_hc.base": "hc_ffn_base", "ffn_hc.scale": "hc_ffn_scale",
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_a_proj.weight": "attn.wq_a.weight", "self_attn.q_a_norm.weight": "attn.q_norm.weight",
    "self_attn.q_b_proj.weight": "attn.wq_b.weight", "self_attn.kv_proj.weight": "attn.wkv.weight",
    "self_attn.kv_norm.weight": "attn.kv_norm.weight", "self_attn.o_a_proj.weight": "attn.wo_a.weight",
    "self_attn.o_b_proj.weight": "attn.wo_b.weight", "mlp.gate.weight": "ffn.gate.weight",
    "mlp.gate.e_score_correction_bias": "ffn.gate.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn.shared_experts.w1.weight",
    "mlp.shared_experts.down_proj.weight": "ffn.shared_experts.w2.weight",
    "mlp.shared_experts.up_proj.weight": "ffn.shared_experts.w3.weight",
}
HEAD_NAMES = {"norm.hc_fn": "hc_head_fn", "norm.hc_base": "hc_head_base", "norm.hc_scale": "hc_head_scale",
              "final_norm.weight": "norm.weight", "head.w1.weight": "markov_head.markov_w1.weight",
              "confidence.proj.weight": "confidence_head.proj.weight"}


def _check_v4(drafter: nn.Module) -> None:
    if getattr(drafter, "spec", None) is None or drafter.spec.backbone != "v4":
        raise ValueError(f"format=v4 needs a drafter with drafter.backbone=v4 (a V4-style DSpark drafter); got "
                         f"{type(drafter).__name__} with backbone {getattr(getattr(drafter, 'spec', None), 'backbone', '?')}")
    if drafter.head is not None and drafter.spec.head != "markov":
        raise ValueError(f"format=v4 stores a Markov head only (markov_head.markov_w1/w2); this drafter has "
                         f"head={drafter.spec.head!r}")


def to_v4_state(drafter: nn.Module) -> dict[str, Tensor]:
    """The drafter's weights under their V4 `mtp.*` names (see the module docstring)."""
    _check_v4(drafter)
    sd = drafter.state_dict()
    L = drafter.spec.num_layers
    last = f"mtp.{L - 1}."
    out: dict[str, Tensor] = {"mtp.0.main_proj.weight": sd["fuse.fc.weight"],
                              "mtp.0.main_norm.weight": sd["fuse.norm.weight"]}
    for i in range(L):
        p, q = f"layers.{i}.", f"mtp.{i}."
        for ours, theirs in LAYER_NAMES.items():
            out[q + theirs] = sd[p + ours]
        gate_up, down = sd[p + "mlp.experts.gate_up_proj"], sd[p + "mlp.experts.down_proj"]
        inter = gate_up.shape[1] // 2
        for e in range(gate_up.shape[0]):
            out[f"{q}ffn.experts.{e}.w1.weight"] = gate_up[e, :inter]
            out[f"{q}ffn.experts.{e}.w3.weight"] = gate_up[e, inter:]
            out[f"{q}ffn.experts.{e}.w2.weight"] = down[e]
        out[q + "attn.attn_sink"] = torch.full((drafter.v4_config.num_attention_heads,), NO_SINK)
    for ours, theirs in HEAD_NAMES.items():
        if ours in sd:
            out[last + theirs] = sd[ours]
    if drafter.head is not None:
        out[last + "markov_head.markov_w2.weight"] = sd["head.w2"].T
    return out


def from_v4_state(drafter: nn.Module, state: dict[str, Tensor]) -> list[str]:
    """Load V4 `mtp.*` tensors into a V4-style drafter of the same shape; returns notes on what differs.

    Refuses missing tensors and shape mismatches, naming them. Published attention sinks cannot be
    represented (no sinks here): they are dropped and reported in the returned notes.
    """
    _check_v4(drafter)
    target = to_v4_state(drafter)  # the expected names and shapes
    notes = []
    missing = sorted(k for k in target if k not in state and not k.endswith("attn.attn_sink"))
    bad = [f"{k}: {tuple(state[k].shape)} in the checkpoint vs {tuple(v.shape)} here" for k, v in target.items()
           if k in state and state[k].shape != v.shape]
    if missing or bad:
        raise ValueError(f"V4 import: {len(missing)} tensors missing ({missing[:6]}...) and {len(bad)} of another "
                         f"shape ({bad[:4]}); the drafter built from the checkpoint's config does not match it")
    sinks = [state[k] for k in state if k.endswith("attn.attn_sink")]
    if sinks and max(float(s.float().max()) for s in sinks) > NO_SINK / 2:
        notes.append("attention sinks dropped (deepspec draft layers have none): logits differ from the "
                     "published drafter until fine-tuned")
    unused = sorted(k for k in state if k not in target)
    if unused:
        notes.append(f"{len(unused)} mtp.* tensors not used: {unused[:6]}")
    L = drafter.spec.num_layers
    sd = {}
    inverse = {v: k for k, v in LAYER_NAMES.items()}
    for i in range(L):
        p, q = f"layers.{i}.", f"mtp.{i}."
        for theirs, ours in inverse.items():
            sd[p + ours] = state[q + theirs]
        E = drafter.v4_config.n_routed_experts
        sd[p + "mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([state[f"{q}ffn.experts.{e}.w1.weight"], state[f"{q}ffn.experts.{e}.w3.weight"]]) for e in range(E)])
        sd[p + "mlp.experts.down_proj"] = torch.stack([state[f"{q}ffn.experts.{e}.w2.weight"] for e in range(E)])
    sd["fuse.fc.weight"], sd["fuse.norm.weight"] = state["mtp.0.main_proj.weight"], state["mtp.0.main_norm.weight"]
    last = f"mtp.{L - 1}."
    for ours, theirs in HEAD_NAMES.items():
        if last + theirs in target:
            sd[ours] = state[last + theirs]
    if drafter.head is not None:
        sd["head.w2"] = state[last + "markov_head.markov_w2.weight"].T
    own = drafter.state_dict()
    drafter.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)
    return notes


def dspark_config(drafter: nn.Module) -> dict:
    """The fields a V4 config.json carries for its DSpark drafter (read by engines and by `import_v4`)."""
    s = drafter.spec
    return {"n_mtp_layers": s.num_layers, "num_nextn_predict_layers": s.num_layers,
            "dspark_target_layer_ids": list(s.layer_ids), "dspark_block_size": s.block_size,
            "dspark_noise_token_id": s.mask_token_id, "dspark_markov_rank": s.markov_rank,
            "enable_confidence_head": drafter.confidence is not None,
            "dspark_sliding_window": drafter.v4_config.sliding_window}


def export_v4(drafter: nn.Module, output_dir, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Write the drafter in the V4 layout (module docstring); returns {files, tensors, params}."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32 if FP32_KEYS.search(k) else dtype).contiguous()
             for k, v in to_v4_state(drafter).items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt", "producer": "deepspec"})
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": {k: WEIGHTS_FILE for k in sorted(state)}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
    (out / DSPARK_CONFIG_FILE).write_text(json.dumps(dspark_config(drafter), indent=2) + "\n")
    (out / DEEPSPEC_FILE).write_text(json.dumps({"spec": asdict(drafter.spec), "shapes": drafter.shapes.to_dict()},
                                                indent=2) + "\n")
    return {"format": "v4", "output_dir": str(out), "tensors": len(state), "bytes": total,
            "params": sum(v.numel() for v in state.values()),
            "files": [WEIGHTS_FILE, "model.safetensors.index.json", DSPARK_CONFIG_FILE, DEEPSPEC_FILE]}


def read_mtp_tensors(directory) -> dict[str, Tensor]:
    """Every `mtp.*` tensor of the safetensors files in `directory` (sharded checkpoints: only the shards
    that hold some); FP8 / FP4 weights with a `.scale` sibling are dequantised to bf16."""
    src = Path(directory)
    files = sorted(src.glob("*.safetensors"))
    index = src / "model.safetensors.index.json"
    if index.exists():
        wm = json.loads(index.read_text())["weight_map"]
        files = sorted({src / f for k, f in wm.items() if k.startswith("mtp.")})
    if not files:
        raise FileNotFoundError(f"V4 import: no safetensors file with mtp.* tensors in {src}")
    raw: dict[str, Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                if k.startswith("mtp."):
                    raw[k] = sf.get_tensor(k)
    out = {}
    for k, v in raw.items():
        if k.endswith(".scale"):
            continue
        scale = raw.get(k.removesuffix(".weight") + ".scale")
        if scale is not None:
            v = _dequantize(k, v, scale)
        elif not v.is_floating_point() or v.element_size() < 2:
            raise ValueError(f"V4 import: {k} is stored as {v.dtype} without a {k.removesuffix('.weight')}.scale "
                             f"tensor; deepspec reads bf16/fp16/fp32 and scaled FP8 / packed-FP4 weights")
        out[k] = v
    return out


def _dequantize(name: str, w: Tensor, scale: Tensor) -> Tensor:
    """Scaled FP8 (e4m3, one scale per 128x128 block) or packed FP4 (two e2m1 per int8 byte, one ue8m0
    scale per 32 inputs: V4's routed experts) -> bf16, with transformers' own V4 dequantiser."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    try:
        return Fp8Dequantize(None)._dequantize_one(w, scale, torch.bfloat16)
    except (ValueError, RuntimeError) as exc:
        raise ValueError(f"V4 import: cannot dequantise {name} ({w.dtype} {tuple(w.shape)}, scale "
                         f"{scale.dtype} {tuple(scale.shape)}): {exc}") from exc


def _published_spec(config: dict, state: dict[str, Tensor]) -> tuple[DrafterSpec, TargetShapes]:
    """Spec and target shapes of a published V4 checkpoint from its config.json and tensor shapes."""
    L = 1 + max(int(k.split(".")[1]) for k in state)
    last = f"mtp.{L - 1}."
    D = int(config["hidden_size"])
    main_in = state["mtp.0.main_proj.weight"].shape[1]
    layer_ids = list(config.get("dspark_target_layer_ids") or [])
    if len(layer_ids) * D != main_in:
        raise ValueError(f"V4 import: config dspark_target_layer_ids={layer_ids} but main_proj reads {main_in} = "
                         f"{main_in // D} x hidden {D}; set dspark_target_layer_ids in the config.json")
    E = len({k.split(".")[4] for k in state if k.startswith("mtp.0.ffn.experts.")})
    rank = state[last + "markov_head.markov_w1.weight"].shape[1]
    heads, head_dim = int(config["num_attention_heads"]), int(config.get("head_dim", 512))
    moe_inter = int(config.get("moe_intermediate_size", state["mtp.0.ffn.experts.0.w1.weight"].shape[0]))
    rope = config.get("qk_rope_head_dim") or int(head_dim * float(config.get("partial_rotary_factor") or 0.125))
    shapes = TargetShapes(model_type="deepseek_v4", num_layers=int(config["num_hidden_layers"]), hidden_size=D,
                          vocab_size=int(config["vocab_size"]), num_heads=heads, num_kv_heads=1, head_dim=head_dim,
                          intermediate_size=moe_inter, rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                          rope_theta=float(config.get("rope_theta", 10000.0)), num_streams=int(config.get("hc_mult", 4)))
    backbone = {"n_routed_experts": E, "num_experts_per_tok": int(config.get("num_experts_per_tok", 6)),
                "moe_intermediate_size": moe_inter, "hc_mult": int(config.get("hc_mult", 4)),
                "q_lora_rank": state["mtp.0.attn.wq_a.weight"].shape[0], "o_groups": int(config.get("o_groups", 8)),
                "o_lora_rank": int(config.get("o_lora_rank", 1024)), "qk_rope_head_dim": int(rope)}
    for key in ("scoring_func", "routed_scaling_factor", "swiglu_limit", "norm_topk_prob", "hc_sinkhorn_iters",
                "hc_eps"):
        if key in config:
            backbone[key] = config[key]
    spec = DrafterSpec(kind="dspark", num_layers=L, block_size=int(config.get("dspark_block_size", 5)),
                       mask_token_id=int(config.get("dspark_noise_token_id", 128799)), head="markov",
                       markov_rank=rank, confidence_head=last + "confidence_head.proj.weight" in state,
                       layer_ids=layer_ids, backbone="v4", backbone_config=backbone,
                       sliding_window=int(config.get("dspark_sliding_window", config.get("sliding_window", 128))))
    return spec, shapes


def import_v4(directory, map_location: str = "cpu") -> tuple[nn.Module, list[str]]:
    """A deepspec drafter from a V4-layout directory (written by `export_v4`, or the published
    checkpoint: config.json + shards holding `mtp.*`); returns (drafter, notes on what differs)."""
    from deepspec.drafters import build_drafter

    src = Path(directory)
    state = read_mtp_tensors(src)
    if (src / DEEPSPEC_FILE).exists():
        meta = json.loads((src / DEEPSPEC_FILE).read_text())
        known = {f.name for f in fields(DrafterSpec)}
        spec = DrafterSpec(**{k: v for k, v in meta["spec"].items() if k in known})
        shapes = TargetShapes.from_dict(meta["shapes"])
    elif (src / "config.json").exists():
        spec, shapes = _published_spec(json.loads((src / "config.json").read_text()), state)
    else:
        raise FileNotFoundError(f"V4 import: {src} has neither {DEEPSPEC_FILE} (a deepspec export) nor config.json "
                                f"(a V4 checkpoint)")
    with torch.device("meta"):  # no throw-away initialisation of ~20 B parameters (V4-Flash)
        drafter = build_drafter(spec, shapes)
    by_dtype: dict[torch.dtype, int] = {}
    for v in state.values():
        by_dtype[v.dtype] = by_dtype.get(v.dtype, 0) + v.numel()
    drafter = drafter.to(max(by_dtype, key=by_dtype.get)).to_empty(device=map_location)
    for name, t in [*drafter.named_parameters(), *drafter.named_buffers()]:
        if FP32_PARAMS.search(name) and t.is_floating_point():
            t.data = t.data.float()  # V4 stores these in float32
    notes = from_v4_state(drafter, state)  # fills every parameter and buffer (strict)
    return drafter, notes


def import_to_checkpoint(directory, output_dir) -> dict:
    """Import a V4-layout drafter and save it as a deepspec checkpoint (usable as `init_from=`)."""
    from deepspec.drafters.io import save_drafter

    drafter, notes = import_v4(directory)
    save_drafter(output_dir, drafter)
    return {"output_dir": str(output_dir), "params": sum(p.numel() for p in drafter.parameters()), "notes": notes}
