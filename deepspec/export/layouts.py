"""Engine layouts: a deepspec drafter <-> (config.json dict, safetensors dict) an engine loads.

Written against vLLM 0.32.0's own loaders (paths relative to site-packages/vllm):

- Eagle3 -> `LlamaForCausalLMEagle3` (model_executor/models/llama_eagle3.py): config fields
  `draft_vocab_size`, `eagle_config.{eagle_aux_hidden_state_layer_ids, use_aux_hidden_state}`
  (:179-216), `target_hidden_size` (:218); weights `fc`, `midlayer.*` (renamed to layers.0 at
  :291), `norm`, and for a pruned vocabulary `lm_head` + `d2t` (`t2d` is skipped, :426-429).
  Without `lm_head`/`embed_tokens` vLLM shares the target's (v1/spec_decode/
  llm_base_proposer.py:1416-1560), which is what an unpruned deepspec Eagle3 uses.
- DFlash and DSpark -> `Qwen3DSparkModel` (model_executor/models/qwen3_dspark.py), served with
  `method: dspark`. Its speculator feeds [anchor, mask x (K-1)] and samples all K slots
  (v1/worker/gpu/spec_decode/dspark/speculator.py:9-17): exactly deepspec's block (docs/algorithms.md,
  "the DSpark variant of DFlash"). Weights `fc`, `hidden_norm` (the context RMSNorm),
  `layers.*` (Qwen3 layers: q_norm/k_norm always present, qwen3_dflash.py:291-313), `norm`,
  `markov_head.markov_w1` [V, r], `markov_head.markov_w2` [V_draft, r] (a ParallelLMHead, so the
  transpose of deepspec's w2 [r, V]), `confidence_head.proj` (fp32, with bias,
  input [h; W1[x_prev]] when `confidence_head_with_markov`). A DFlash drafter has no sequential
  head: it is written with a rank-1 all-zero Markov head, an exact no-op.
- `dflash_layout="dflash"` writes vLLM's `DFlashDraftModel` (qwen3_dflash.py) instead. vLLM's
  `dflash` method feeds [anchor, mask x K] and samples the K *mask* slots (spec_decode/utils.py
  kernel, "mask tokens, skip the bonus token"), whereas a deepspec block predicts from the
  anchor slot on: drafts arrive shifted by one. The key check refuses it (export.check=false
  writes it anyway, for a lossless-but-low-acceptance smoke run on vLLM's V1/CPU path).

SGLang reads the same architectures and fields; only the layer-id convention differs
(conventions.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from deepspec.choices import BlockLayout
from deepspec.drafters.registry import kind_entry
from deepspec.export.conventions import (
    TOP_LEVEL_EAGLE3_IDS,
    from_engine_ids,
    layer_id_field,
    sorted_taps,
    to_engine_ids,
    written_layer_ids,
)

EXPORT_VERSION = 1
UNMAPPED_PREFIX = "deepspec_unmapped."  # tensors with no engine name keep this prefix (the check refuses)
FP32_KEYS = ("confidence_head.proj.weight", "confidence_head.proj.bias")  # vLLM builds them in fp32
VLLM_METHOD = {"eagle3": "eagle3", "dspark": "dspark", "dflash": "dflash"}


@dataclass
class EngineExport:
    """What an engine directory holds: config.json, tensors, and where they came from."""

    engine: str
    kind: str
    architecture: str
    method: str  # vLLM speculative_config.method / SGLang algorithm (lower case)
    config: dict[str, Any]
    tensors: dict[str, Tensor]
    notes: list[str] = field(default_factory=list)


def _permute_fc(fc_DX: Tensor, perm: list[int], inverse: bool = False) -> Tensor:
    """Reorder the column blocks (one per tap) of a fused projection [D, m*D_t]."""
    blocks = list(fc_DX.chunk(len(perm), dim=1))
    if inverse:
        out = [None] * len(perm)
        for dst, src in enumerate(perm):
            out[src] = blocks[dst]
        return torch.cat(out, dim=1)
    return torch.cat([blocks[i] for i in perm], dim=1)


def _common_config(spec, shapes, dtype: str) -> dict[str, Any]:
    return {
        "hidden_size": shapes.hidden_size, "intermediate_size": spec.intermediate_size,
        "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim, "rms_norm_eps": shapes.rms_norm_eps, "hidden_act": "silu",
        "rope_theta": shapes.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": shapes.rope_theta},
        "max_position_embeddings": shapes.max_position_embeddings, "vocab_size": shapes.vocab_size,
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "target_hidden_size": shapes.hidden_size, "torch_dtype": dtype,
    }


def deepspec_block(drafter: nn.Module, engine: str, sts_temperatures: list[float] | None) -> dict[str, Any]:
    """The `deepspec` entry of config.json: enough to rebuild the drafter (engines ignore it)."""
    return {"export_version": EXPORT_VERSION, "engine": engine, "kind": drafter.spec.kind,
            "spec": asdict(drafter.spec), "shapes": drafter.shapes.to_dict(),
            "layer_ids": list(drafter.spec.layer_ids),
            "layer_id_convention": "deepspec layer k = output of decoder layer k",
            "mask_token_id": drafter.spec.mask_token_id, "sts_temperatures": sts_temperatures}


# ---- Eagle3 ------------------------------------------------------------------------------------
def eagle3_layout(drafter: nn.Module, engine: str, dtype: str) -> EngineExport:
    spec, shapes = drafter.spec, drafter.shapes
    ids = to_engine_ids(engine, "eagle3", spec.layer_ids)
    config = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "num_hidden_layers": 1,
              **_common_config(spec, shapes, dtype),
              "draft_vocab_size": spec.draft_vocab_size or shapes.vocab_size,
              "eagle_config": {"eagle_aux_hidden_state_layer_ids": ids, "use_aux_hidden_state": True}}
    if engine in TOP_LEVEL_EAGLE3_IDS:
        # vLLM's V2 model runner (GPU) reads only the top-level field (v1/worker/gpu/spec_decode/eagle/
        # eagle3_utils.py:106-135) and otherwise falls back to its default taps; V1 reads it first too.
        # llama.cpp's converter reads only the top-level field too (conversion/llama.py), else [2, L//2, L-3].
        config["eagle_aux_hidden_state_layer_ids"] = ids
    tensors: dict[str, Tensor] = {}
    for name, t in drafter.state_dict().items():
        if name == "fc.weight":
            t = _permute_fc(t, sorted_taps(spec.layer_ids))
        tensors[name if name.startswith(("fc.", "midlayer.", "norm.", "d2t", "t2d"))
                else UNMAPPED_PREFIX + name] = t
    if spec.draft_vocab_size is not None:
        # the pruned draft head is the frozen slice of the target's LM head; the engine needs it written
        if not drafter.target_attached:
            raise ValueError("Eagle3 with a pruned vocabulary: the export writes lm_head = the target's LM head rows "
                             "at the kept ids, so attach the target first (deepspec export loads it from the recipe)")
        tensors["lm_head.weight"] = drafter.draft_lm_head()
    return EngineExport(engine, "eagle3", "LlamaForCausalLMEagle3", "eagle3", config, tensors)


# ---- DFlash / DSpark ---------------------------------------------------------------------------
_BLOCK_RENAME = {"fuse.fc.weight": "fc.weight", "fuse.norm.weight": "hidden_norm.weight",
                 "norm.weight": "norm.weight", "head.w1.weight": "markov_head.markov_w1.weight",
                 "confidence.proj.weight": "confidence_head.proj.weight",
                 "confidence.proj.bias": "confidence_head.proj.bias"}


def block_layout(drafter: nn.Module, engine: str, dtype: str, dflash_layout: str = "dspark") -> EngineExport:
    """DFlash/DSpark drafter -> Qwen3DSparkModel (default) or DFlashDraftModel."""
    spec, shapes = drafter.spec, drafter.shapes
    ids = to_engine_ids(engine, spec.kind, spec.layer_ids)
    config = {"model_type": "qwen3", "num_hidden_layers": spec.num_layers, **_common_config(spec, shapes, dtype),
              "block_size": spec.block_size, "mask_token_id": spec.mask_token_id,
              "dflash_config": {"mask_token_id": spec.mask_token_id, "target_layer_ids": ids,
                                "use_aux_hidden_state": True, "causal": False},
              "draft_vocab_size": shapes.vocab_size, "use_sliding_window": False}
    tensors: dict[str, Tensor] = {}
    head = getattr(drafter, "head", None)
    for name, t in drafter.state_dict().items():
        if name == "fuse.fc.weight":
            t = _permute_fc(t, sorted_taps(spec.layer_ids))
        if name == "head.w2" and spec.head == "markov":
            tensors["markov_head.markov_w2.weight"] = t.t().contiguous()
        elif name in _BLOCK_RENAME and not (name.startswith("head.") and spec.head != "markov"):
            tensors[_BLOCK_RENAME[name]] = t
        elif name.startswith("layers."):
            tensors[name] = t
        else:
            tensors[UNMAPPED_PREFIX + name] = t  # e.g. the RNN head: no place in the engines
    if dflash_layout == BlockLayout.dflash:
        config["architectures"] = ["DFlashDraftModel"]
        return EngineExport(engine, spec.kind, "DFlashDraftModel", "dflash", config, tensors,
                            notes=["DFlashDraftModel: the engine's dflash method samples the K mask slots after "
                                   "the anchor; this drafter predicts from the anchor slot on (drafts shift by one)"])
    if dflash_layout != BlockLayout.dspark:
        raise ValueError(f"export.dflash_layout={dflash_layout!r}; choose dspark (exact) or dflash")
    rank = spec.markov_rank if spec.head == "markov" else 1
    uses_prev = getattr(getattr(drafter, "confidence", None), "uses_prev", False)
    config.update({"architectures": ["Qwen3DSparkModel"], "dspark_block_size": spec.block_size,
                   "sample_from_anchor": True, "dspark_bonus_anchor": False, "markov_rank": rank,
                   "markov_head_type": "vanilla",
                   "enable_confidence_head": getattr(drafter, "confidence", None) is not None,
                   "confidence_head_with_markov": bool(uses_prev)})
    notes = []
    if spec.head != "markov":
        ref = next(iter(tensors.values()))
        tensors["markov_head.markov_w1.weight"] = ref.new_zeros(shapes.vocab_size, 1)
        tensors["markov_head.markov_w2.weight"] = ref.new_zeros(shapes.vocab_size, 1)
        if head is None:
            notes.append("no sequential head: written as a rank-1 all-zero Markov head (an exact no-op)")
    return EngineExport(engine, spec.kind, "Qwen3DSparkModel", "dspark", config, tensors, notes)


def engine_layout(drafter: nn.Module, engine: str, dtype: str, sts_temperatures: list[float] | None = None,
                  dflash_layout: str = "dspark") -> EngineExport:
    """The export of `drafter` for `engine` (vllm | sglang), tensors cast to `dtype`."""
    if not kind_entry(drafter).parallel_blocks:
        out = eagle3_layout(drafter, engine, dtype)
    else:
        out = block_layout(drafter, engine, dtype, dflash_layout)
    out.config["deepspec"] = deepspec_block(drafter, engine, sts_temperatures)
    if sts_temperatures is not None:
        out.config["confidence_sts_temperatures"] = list(sts_temperatures)
    target = getattr(torch, dtype)
    out.tensors = {k: (v.detach().to(torch.float32 if k in FP32_KEYS else target) if v.is_floating_point()
                       else v.detach()).contiguous().cpu() for k, v in out.tensors.items()}
    return out


# ---- back to deepspec --------------------------------------------------------------------------
def deepspec_state(config: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Engine tensors -> the deepspec drafter's state_dict (inverse of `engine_layout`)."""
    meta = config["deepspec"]
    spec, kind = meta["spec"], meta["kind"]
    written = written_layer_ids(config, kind)
    if from_engine_ids(meta["engine"], kind, written) != sorted(meta["layer_ids"]):
        raise ValueError(f"config.json layer ids {written} ({meta['engine']} convention, field "
                         f"{layer_id_field(meta['engine'], kind)}) do not match the drafter's taps "
                         f"{meta['layer_ids']}: the file was edited or written by another tool")
    perm = sorted_taps(meta["layer_ids"])
    state: dict[str, Tensor] = {}
    back = {v: k for k, v in _BLOCK_RENAME.items()}
    for name, t in tensors.items():
        if name.startswith(UNMAPPED_PREFIX):
            state[name[len(UNMAPPED_PREFIX):]] = t
        elif not kind_entry(kind).parallel_blocks:
            if name != "lm_head.weight":  # the frozen target slice: not part of the drafter's state
                state[name] = _permute_fc(t, perm, inverse=True) if name == "fc.weight" else t
        elif name == "markov_head.markov_w2.weight":
            if spec["head"] == "markov":
                state["head.w2"] = t.t().contiguous()
        elif name == "markov_head.markov_w1.weight":
            if spec["head"] == "markov":
                state["head.w1.weight"] = t
        elif name == "fc.weight":
            state["fuse.fc.weight"] = _permute_fc(t, perm, inverse=True)
        elif name in back:
            state[back[name]] = t
        else:
            state[name] = t
    return state
