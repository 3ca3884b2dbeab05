"""`deepspec import SRC output_dir=C`: a released drafter -> a deepspec checkpoint.

The checkpoint C is what `deepspec train` writes (drafter_config.json + drafter.safetensors), so it
works as `init_from=C`, `draft=C` and in `eval.baselines=[C]`; `deepspec export draft=C format=...`
writes it back in the layout it came from. Layouts recognised from what SRC holds:

- `v4`: a DeepSeek-V4 checkpoint directory (config.json + safetensors shards) whose `mtp.0` ..
  `mtp.{L-1}` tensors are its DSpark drafter -- the layout DeepSeek-V4-Flash-DSpark, V4-Flash-0731
  and V4.1 share (`main_proj` / `main_norm` fusing the taps, V4 decoder blocks, hc_head, Markov head
  `markov_head.markov_w1/w2`, confidence head) -- or a `deepspec export format=v4` directory. FP8
  weights (e4m3, one scale per 128 x 128 block, `<name>.scale` beside `<name>.weight`) and FP4
  weights (two e2m1 values per byte, one ue8m0 scale per 32 inputs: the routed experts) are
  dequantised to bf16. Any mtp.* tensor the recognised layout does not have is refused by name (a
  variant this reader does not know). V4's original one-layer MTP module (`e_proj` / `h_proj` /
  `enorm` / `hnorm`) is recognised and refused here: it is not a DSpark drafter.
- `deepspec-hf`: a DeepSpec-format HF drafter (DeepSpec's published Qwen3 / Gemma4 drafters, and
  vLLM's `Qwen3DSparkModel`): flat `block_size`, `mask_token_id`, `markov_rank`,
  `enable_confidence_head`, `dflash_config.target_layer_ids` (id k = output of target layer k, as
  deepspec counts), Qwen3 draft layers; weights `fc`, `hidden_norm`, `layers.*`, `norm`,
  `markov_head.*`, `confidence_head.proj`.
- `speculators`: the same drafter packaged for vLLM's speculators loader: `speculators_model_type:
  dspark`, `aux_hidden_state_layer_ids` (= deepspec id + 1), the draft layers' fields under
  `transformer_layer_config`; same weight names.
- `deepspec`: any `deepspec export` output (its config.json carries a `deepspec` entry).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from deepspec.drafters.spec import DrafterSpec
from deepspec.targets.shapes import TargetShapes

LAYOUTS = ("v4", "deepspec-hf", "speculators", "deepspec")
_BLOCK_ARCHITECTURES = ("Qwen3DSparkModel", "DSparkDraftModel", "DFlashDraftModel", "Qwen3DFlashModel")
_MTP_MODULE_KEYS = ("e_proj.weight", "h_proj.weight", "enorm.weight", "hnorm.weight")


def detect_layout(src: Path) -> str:
    """Which of LAYOUTS the directory `src` holds (ValueError naming what was found otherwise)."""
    if not src.is_dir():
        raise FileNotFoundError(f"deepspec import: {src} is not a directory; give the folder of a released drafter "
                                f"(a DeepSeek-V4 checkpoint, a DeepSpec HF drafter or a speculators drafter)")
    if (src / "drafter_config.json").is_file():
        raise ValueError(f"deepspec import: {src} is already a deepspec checkpoint; use it directly as "
                         f"init_from= / draft=")
    config = _read_json(src / "config.json")
    if config is not None and "deepspec" in config:
        return "deepspec"
    if (src / "deepspec_v4.json").is_file() or _mtp_names(src):
        return "v4"
    if config is None:
        raise ValueError(f"deepspec import: {src} has no config.json and no safetensors with mtp.* tensors")
    if config.get("speculators_model_type"):
        return "speculators"
    if set(config.get("architectures") or []) & set(_BLOCK_ARCHITECTURES):
        return "deepspec-hf"
    raise ValueError(f"deepspec import: {src}/config.json is none of the layouts read here (architectures "
                     f"{config.get('architectures')}, model_type {config.get('model_type')!r}); known: a V4 "
                     f"checkpoint with mtp.* tensors, {' / '.join(_BLOCK_ARCHITECTURES)} (DeepSpec HF), "
                     f"speculators_model_type: dspark, or a deepspec export")


def import_drafter(src, output_dir) -> dict:
    """Import the drafter in `src`, save it as a deepspec checkpoint in `output_dir`; returns the summary."""
    from deepspec.drafters.io import save_drafter

    src = Path(src)
    layout = detect_layout(src)
    notes: list[str] = []
    if layout == "v4":
        drafter, variant, notes = _import_v4(src)
    elif layout == "deepspec":
        from deepspec.export.drafter import load_exported

        drafter = load_exported(src)
        variant = f"deepspec export ({json.loads((src / 'config.json').read_text())['deepspec']['engine']})"
    else:
        drafter, variant, notes = _import_block_hf(src, layout)
    save_drafter(output_dir, drafter)
    params = sum(p.numel() for p in drafter.parameters())
    return {"source": str(src), "layout": layout, "variant": variant, "output_dir": str(output_dir),
            "kind": str(drafter.spec.kind), "num_layers": drafter.spec.num_layers,
            "block_size": drafter.spec.block_size, "layer_ids": list(drafter.spec.layer_ids), "params": params,
            "notes": notes}


# ---- DeepSeek-V4 mtp.* ---------------------------------------------------------------------------
def _mtp_names(src: Path) -> dict[str, str]:
    """{mtp.* tensor name: its stored dtype} over the safetensors files of `src` (headers only)."""
    out: dict[str, str] = {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                if k.startswith("mtp."):
                    out[k] = sf.get_slice(k).get_dtype()
    return out


def _import_v4(src: Path):
    from deepspec.export.v4 import import_v4, to_v4_state

    stored = _mtp_names(src)
    names = {k for k in stored if not k.endswith(".scale")}
    if "mtp.0.main_proj.weight" not in names:
        module = sorted(k for k in names if k.startswith("mtp.0.") and k.split(".", 2)[2] in _MTP_MODULE_KEYS)
        if module:
            raise ValueError(f"deepspec import: {src} holds V4's own MTP module ({', '.join(module)}), not a "
                             f"DSpark drafter (no mtp.0.main_proj.weight); evaluate it with eval.baselines=[mtp]")
        raise ValueError(f"deepspec import: {src} has mtp.* tensors but not the DSpark drafter layout (no "
                         f"mtp.0.main_proj.weight); unexpected tensors: {sorted(names)[:12]}")
    drafter, notes = import_v4(src)
    expected = set(to_v4_state(drafter))
    unexpected = sorted(names - expected)
    if unexpected:
        raise ValueError(f"deepspec import: {src} is a V4 DSpark layout with {len(unexpected)} mtp.* tensors this "
                         f"reader does not know: {unexpected[:12]}{' ...' if len(unexpected) > 12 else ''}. It is a "
                         f"variant deepspec cannot represent; nothing was written")
    notes = [n for n in notes if "not used" not in n]
    scaled = {k.removesuffix(".scale") + ".weight" for k in stored if k.endswith(".scale")}
    fp8 = sum(1 for k in scaled if stored.get(k, "").startswith("F8"))
    fp4 = sum(1 for k in scaled if stored.get(k) in ("I8", "U8", "F4"))
    config = _read_json(src / "config.json") or {}
    extra = sorted(k for k in config if "vision" in k or "engram" in k)
    L, K = drafter.spec.num_layers, drafter.spec.block_size
    variant = (f"DeepSeek-V4 DSpark drafter in mtp.0-mtp.{L - 1} ({L} stages, block {K}; the layout of "
               f"V4-Flash-DSpark, V4-Flash-0731 and V4.1)")
    if extra:
        variant += f"; config.json also describes {', '.join(extra)} (V4.1): ignored, only mtp.* is read"
    if (src / "deepspec_v4.json").is_file():
        variant = f"deepspec export format=v4 ({L} stages, block {K})"
    notes.append(f"dequantised to bf16: {fp8} FP8 and {fp4} FP4 weights; {len(names) - fp8 - fp4} tensors stored "
                 f"unquantised")
    return drafter, variant, notes


# ---- DeepSpec HF / speculators (Qwen3 draft layers) ----------------------------------------------
def _import_block_hf(src: Path, layout: str):
    from deepspec.drafters import build_drafter
    from deepspec.export.layouts import deepspec_state

    config = _read_json(src / "config.json")
    spec, shapes, written, notes = _block_spec(config, layout, src)
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"deepspec import: no *.safetensors weights in {src}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    drafter = build_drafter(spec, shapes)
    # the engine layout's own inverse, told what the foreign config holds
    meta_config = {"dflash_config": {"target_layer_ids": written},
                   "deepspec": {"engine": "vllm", "kind": str(spec.kind), "spec": _spec_dict(spec),
                                "layer_ids": list(spec.layer_ids)}}
    state = deepspec_state(meta_config, tensors)
    own = drafter.state_dict()
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state))
    bad = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in set(state) & set(own)
           if state[k].shape != own[k].shape]
    if unexpected or missing or bad:
        raise ValueError(f"deepspec import: {src} does not match a {spec.kind} drafter built from its config.json: "
                         f"unexpected tensors {unexpected[:10]}, missing {missing[:10]}, other shapes {bad[:6]}")
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(dtypes) == 1:
        drafter.to(dtypes.pop())
    for name, t in state.items():  # per-tensor precision as stored (the confidence head is often fp32)
        if t.is_floating_point():
            _set_dtype(drafter, name, t.dtype)
    drafter.load_state_dict(state, strict=True)
    variant = {"deepspec-hf": f"DeepSpec HF drafter ({', '.join(config.get('architectures') or [])})",
               "speculators": "speculators-format DSpark drafter"}[layout]
    return drafter, variant, notes


def _block_spec(config: dict, layout: str, src: Path):
    """(spec, target shapes, layer ids as written, notes) of a Qwen3 DFlash/DSpark drafter config."""
    layer = dict(config)
    notes: list[str] = []
    if layout == "speculators":
        if config.get("speculators_model_type") not in ("dspark", "dflash"):
            raise ValueError(f"deepspec import: {src}/config.json speculators_model_type="
                             f"{config.get('speculators_model_type')!r}; deepspec reads dspark and dflash")
        layer.update(config.get("transformer_layer_config") or {})
        written = [int(i) - 1 for i in config.get("aux_hidden_state_layer_ids") or []]
    else:
        written = list((config.get("dflash_config") or {}).get("target_layer_ids")
                       or config.get("target_layer_ids") or [])
    need = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
            "intermediate_size")
    absent = [k for k in need if layer.get(k) is None]
    if absent or not written:
        raise ValueError(f"deepspec import: {src}/config.json lacks {absent + ([] if written else ['layer ids'])}: "
                         f"cannot rebuild the draft layers")
    if str(layer.get("model_type", "qwen3")) not in ("qwen3", "llama"):
        raise ValueError(f"deepspec import: draft layers of model_type {layer.get('model_type')!r}; deepspec "
                         f"rebuilds Qwen3 / Llama draft layers")
    mask = config.get("mask_token_id", (config.get("dflash_config") or {}).get("mask_token_id"))
    rank = int(config.get("markov_rank") or 0)
    vocab = int(layer["vocab_size"])
    if config.get("draft_vocab_size") not in (None, vocab):
        raise ValueError(f"deepspec import: draft_vocab_size={config['draft_vocab_size']} < vocab {vocab}: "
                         f"pruned-vocabulary DSpark drafters are not supported by deepspec's DSpark")
    head_dim = int(layer.get("head_dim") or int(layer["hidden_size"]) // int(layer["num_attention_heads"]))
    kind = "dspark" if rank > 0 or config.get("enable_confidence_head") else "dflash"
    if kind == "dspark" and rank > 0 and not _nonzero_markov(src):
        rank = 0  # deepspec's DFlash written as DSpark: an all-zero rank-1 Markov head (exact no-op)
    spec = DrafterSpec(kind=kind, num_layers=int(layer["num_hidden_layers"]),
                       block_size=int(config.get("block_size") or config.get("dspark_block_size") or 7),
                       mask_token_id=int(mask) if mask is not None else None,
                       head="markov" if rank > 0 else "none", markov_rank=max(rank, 1),
                       confidence_head=bool(config.get("enable_confidence_head", False)),
                       confidence_uses_markov=bool(config.get("confidence_head_with_markov", rank > 0)),
                       layer_ids=sorted(written), intermediate_size=int(layer["intermediate_size"]),
                       num_heads=int(layer["num_attention_heads"]), num_kv_heads=int(layer["num_key_value_heads"]),
                       head_dim=head_dim, qk_norm=True)
    rope = (layer.get("rope_parameters") or {}).get("rope_theta", layer.get("rope_theta", 10000.0))
    n_target = int(config.get("num_target_layers") or max(written) + 2)
    if not config.get("num_target_layers"):
        notes.append(f"config.json does not say how many layers the target has; recorded as {n_target} "
                     f"(only bounds the tapped ids {sorted(written)})")
    shapes = TargetShapes(model_type=str(layer.get("model_type", "qwen3")), num_layers=n_target,
                          hidden_size=int(layer["hidden_size"]), vocab_size=vocab,
                          num_heads=int(layer["num_attention_heads"]),
                          num_kv_heads=int(layer["num_key_value_heads"]), head_dim=head_dim,
                          intermediate_size=int(layer["intermediate_size"]),
                          rms_norm_eps=float(layer.get("rms_norm_eps", 1e-6)), rope_theta=float(rope),
                          max_position_embeddings=int(layer.get("max_position_embeddings", 8192)))
    return spec, shapes, written, notes


def _nonzero_markov(src: Path) -> bool:
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            if "markov_head.markov_w1.weight" in sf.keys():
                w = sf.get_tensor("markov_head.markov_w1.weight")
                return w.shape[1] > 1 or bool(w.any())
    return False


def _spec_dict(spec: DrafterSpec) -> dict:
    from dataclasses import asdict

    return asdict(spec)


def _set_dtype(module: torch.nn.Module, name: str, dtype: torch.dtype) -> None:
    *path, leaf = name.split(".")
    for p in path:
        module = getattr(module, p)
    t = getattr(module, leaf)
    t.data = t.data.to(dtype)


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"deepspec import: {path} is not valid JSON ({exc})") from None


def run(cfg) -> dict:
    """Turn a released drafter into a deepspec checkpoint (usable as init_from=, draft=, eval.baselines=).

    deepspec import SRC output_dir=C        (SRC may also be given as input=SRC)

    SRC: a DeepSeek-V4 checkpoint directory (its DSpark drafter under mtp.*; FP8 / FP4 weights are
    dequantised), a DeepSpec HF drafter (Qwen3DSparkModel / DFlashDraftModel), a speculators-format
    DSpark drafter, or any `deepspec export` output. Prints the layout and variant recognised; an
    unknown variant is refused with the tensors it did not expect. `deepspec export draft=C
    format=v4|vllm|hf` writes the (fine-tuned) drafter back.
    """
    from deepspec.runs import format_table, print0, run_started

    if not cfg.input:
        raise ValueError("deepspec import: give the released drafter's directory: deepspec import SRC output_dir=C")
    out = Path(cfg.output_dir)
    if out.is_dir() and any(not p.name.startswith(".") and p.name not in ("summary.json", "config.yaml")
                            for p in out.iterdir()) and not cfg.overwrite:
        raise FileExistsError(f"deepspec import: output_dir={out} is not empty; choose another or set overwrite=true")
    run_started()
    summary = import_drafter(cfg.input, out)
    print0(format_table([{"field": k, "value": str(summary[k])} for k in
                         ("layout", "variant", "kind", "num_layers", "block_size", "layer_ids", "params")]))
    for note in summary["notes"]:
        print0(f"note: {note}")
    print0(f"deepspec checkpoint written to {out}: use it as init_from={out}, draft={out} or eval.baselines=[{out}]")
    return summary
