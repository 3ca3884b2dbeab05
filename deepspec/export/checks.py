"""Key check: refuse an export the engine would refuse or silently misread.

`expected_keys(config)` derives, from config.json alone, the tensors (name -> shape) that the
engine's model class builds and loads for that config, following vLLM 0.32.0's code
(llama_eagle3.py, qwen3_dflash.py, qwen3_dspark.py; see layouts.py). `check_export` compares
them with what is about to be written and raises `ExportCheckError` naming every missing,
unexpected and mis-shaped key, plus the semantic traps the key sets cannot show (block
semantics, tap order/duplicates, a confidence head the engine would drop).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from deepspec.drafters.registry import kind_entry
from deepspec.export.conventions import (
    TOP_LEVEL_EAGLE3_IDS,
    engine_problems,
    layer_id_field,
    tapped_output_layers,
    written_layer_ids,
)

# Keys the engines accept but do not require (shared from the target, or ignored).
OPTIONAL = {
    "LlamaForCausalLMEagle3": ("embed_tokens.weight", "t2d"),
    "Qwen3DSparkModel": ("embed_tokens.weight", "lm_head.weight"),
    "DFlashDraftModel": ("embed_tokens.weight", "lm_head.weight"),
}


class ExportCheckError(ValueError):
    """An export the engine would refuse or misread; the message lists every problem."""


def _layer_keys(prefix: str, D: int, H: int, Hkv: int, hd: int, inter: int, in_dim: int, qk_norm: bool) -> dict:
    keys = {f"{prefix}input_layernorm.weight": (D,), f"{prefix}post_attention_layernorm.weight": (D,),
            f"{prefix}self_attn.q_proj.weight": (H * hd, in_dim), f"{prefix}self_attn.k_proj.weight": (Hkv * hd, in_dim),
            f"{prefix}self_attn.v_proj.weight": (Hkv * hd, in_dim), f"{prefix}self_attn.o_proj.weight": (D, H * hd),
            f"{prefix}mlp.gate_proj.weight": (inter, D), f"{prefix}mlp.up_proj.weight": (inter, D),
            f"{prefix}mlp.down_proj.weight": (D, inter)}
    if qk_norm:
        keys[f"{prefix}self_attn.q_norm.weight"] = (hd,)
        keys[f"{prefix}self_attn.k_norm.weight"] = (hd,)
    return keys


def expected_keys(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensors the engine loads for `config` (name -> shape); optional ones are in OPTIONAL."""
    arch = (config.get("architectures") or [None])[0]
    D, V = config["hidden_size"], config["vocab_size"]
    H, Hkv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or D // H
    inter, Dt = config["intermediate_size"], config.get("target_hidden_size") or D
    Vd = config.get("draft_vocab_size") or V
    if arch == "LlamaForCausalLMEagle3":
        n_aux = len(config["eagle_config"]["eagle_aux_hidden_state_layer_ids"])
        keys = {"fc.weight": (D, n_aux * Dt), "midlayer.hidden_norm.weight": (D,), "norm.weight": (D,)}
        keys.update(_layer_keys("midlayer.", D, H, Hkv, hd, inter, 2 * D, qk_norm=False))  # LlamaAttention: no q/k norm
        if Vd != V:
            keys.update({"lm_head.weight": (Vd, D), "d2t": (Vd,)})
        return keys
    if arch in ("Qwen3DSparkModel", "DFlashDraftModel"):
        m = len(config["dflash_config"]["target_layer_ids"])
        keys = {"fc.weight": (D, m * Dt), "hidden_norm.weight": (D,), "norm.weight": (D,)}
        for i in range(config["num_hidden_layers"]):
            keys.update(_layer_keys(f"layers.{i}.", D, H, Hkv, hd, inter, D, qk_norm=True))  # always q/k norm
        if arch == "Qwen3DSparkModel":
            r = config["markov_rank"]
            keys.update({"markov_head.markov_w1.weight": (V, r), "markov_head.markov_w2.weight": (Vd, r)})
            if config.get("enable_confidence_head"):
                cin = D + (r if config.get("confidence_head_with_markov") else 0)
                keys.update({"confidence_head.proj.weight": (1, cin), "confidence_head.proj.bias": (1,)})
        return keys
    raise ExportCheckError(f"config.json architectures={config.get('architectures')}: no engine layout known "
                           f"(LlamaForCausalLMEagle3, Qwen3DSparkModel, DFlashDraftModel)")


WHY_MISSING = {
    "q_norm": "the engine's Qwen3 draft layers always apply per-head q/k RMSNorm (vllm qwen3_dflash.py:291-313) "
              "and this drafter was built without it (a Llama-family target): attention would differ. "
              "Retrain with drafter.qk_norm=true or use format=hf",
    "confidence_head": "vLLM drops the confidence head when its weights are absent (qwen3_dspark.py:366-368)",
}
WHY_UNEXPECTED = {
    "head.gates": "an RNN sequential head has no place in vLLM/SGLang DSpark (only the Markov head, "
                  "qwen3_dspark.py:48-93): refusing rather than dropping it; use format=hf",
    "q_norm": "the engine's Llama Eagle3 layer has no q/k norm (llama_eagle3.py:67-104); this Qwen3-family "
              "drafter would lose it",
}


def _listing(label: str, names: list[str], table: dict[str, str]) -> str:
    """'label: a; b; ...' followed by each distinct reason the table gives for those names, once."""
    shown = "; ".join(names[:12]) + (f"; ... {len(names) - 12} more" if len(names) > 12 else "")
    reasons = [text for key, text in table.items() if any(key in n for n in names)]
    return f"{label}: {shown}" + "".join(f"\n    why: {r}" for r in reasons)


def check_export(config: Mapping[str, Any], shapes_by_name: Mapping[str, tuple[int, ...]]) -> None:
    """Raise ExportCheckError unless the engine would load exactly these tensors as trained."""
    problems: list[str] = []
    try:
        expected = expected_keys(config)
    except (KeyError, TypeError) as exc:
        raise ExportCheckError(f"config.json lacks a field the engine reads: {exc}") from None
    arch = config["architectures"][0]
    optional = OPTIONAL.get(arch, ())
    missing = sorted(set(expected) - set(shapes_by_name))
    unexpected = sorted(k for k in set(shapes_by_name) - set(expected) if k not in optional)
    wrong = sorted(k for k in set(expected) & set(shapes_by_name) if tuple(shapes_by_name[k]) != tuple(expected[k]))
    if missing:
        problems.append(_listing("missing keys", missing, WHY_MISSING))
    if unexpected:
        problems.append(_listing("unexpected keys", unexpected, WHY_UNEXPECTED))
    if wrong:
        problems.append("wrong shapes: " + "; ".join(f"{k} {tuple(shapes_by_name[k])} != {tuple(expected[k])}"
                                                      for k in wrong))
    problems += _semantic_problems(config, arch)
    if problems:
        raise ExportCheckError(f"refusing to write a {arch} export the engine would misread:\n  - "
                               + "\n  - ".join(problems))


def _semantic_problems(config: Mapping[str, Any], arch: str) -> list[str]:
    meta = config.get("deepspec") or {}
    spec = meta.get("spec") or {}
    out = []
    if arch == "DFlashDraftModel" and meta:
        out.append("block semantics: vLLM's dflash method feeds [anchor, mask x K] and samples the K mask slots "
                   "(vllm/v1/spec_decode/utils.py copy_and_expand_dflash_inputs_kernel), a deepspec block predicts "
                   "from the anchor slot on, so every draft would be read one position late; use the default "
                   "export.dflash_layout=dspark (Qwen3DSparkModel, method dspark)")
    if spec.get("backbone", "llama") != "llama":
        out.append(f"drafter.backbone={spec['backbone']!r}: vLLM/SGLang's generic DSpark/DFlash/Eagle3 draft "
                   f"layers are dense Llama/Qwen3 layers; a DeepSeek-V4-style drafter exports with format=v4")
    if spec.get("sliding_window") is not None:
        out.append(f"drafter.sliding_window={spec['sliding_window']}: the export does not encode draft sliding "
                   f"windows yet")
    if meta:
        engine, kind = meta["engine"], meta["kind"]
        field = layer_id_field(engine, kind)
        written = written_layer_ids(config, kind)
        top = config.get("eagle_aux_hidden_state_layer_ids")
        if not kind_entry(kind).parallel_blocks and engine in TOP_LEVEL_EAGLE3_IDS and top != written:
            out.append(f"eagle_aux_hidden_state_layer_ids={top} (top level, the only place {engine} reads) "
                       f"differs from eagle_config's {written}")
        taps = tapped_output_layers(engine, kind, written or [])
        if taps != sorted(meta["layer_ids"]):
            out.append(f"{field}={written}: {engine} would feed the outputs of layers {taps}, the drafter was "
                       f"trained on {sorted(meta['layer_ids'])}")
        qk_norm = spec.get("qk_norm")
        if qk_norm is None:  # unset: the target's for block drafters, none for Eagle3 (as the drafters build)
            qk_norm = bool((meta.get("shapes") or {}).get("qk_norm")) and kind_entry(kind).parallel_blocks
        out += engine_problems(engine, kind, bool(qk_norm))
        if kind_entry(kind).parallel_blocks:
            mask = (config.get("dflash_config") or {}).get("mask_token_id")
            if mask != meta.get("mask_token_id"):
                out.append(f"dflash_config.mask_token_id={mask} but the drafter was trained with "
                           f"{meta.get('mask_token_id')}")
    return out
