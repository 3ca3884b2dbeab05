"""One entry per drafter kind: everything the rest of deepspec needs to know about a kind.

Callers never compare `spec.kind` with a name; they ask the kind's entry (`kind_entry(spec)`)
how to build it, how its training batches and losses are formed, how the decoding engine calls
it, how it is exported and which recipe the quickstart trains it with. Adding a kind means: its
module under `deepspec/drafters/`, one `KindEntry` below, a `configs/drafter/<kind>.yaml` and
its tests (docs/extending.md walks through it).

Two families exist today:
- parallel block drafters (DFlash, DSpark): one forward drafts a whole block from the anchor
  plus mask slots; trained on packed anchor blocks with CE/TV (+ confidence) distillation;
- autoregressive drafters (Eagle3): one token per forward over fused target features; trained
  on whole sequences with training-time test and a soft cross-entropy.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Optional

from torch import nn

from deepspec.drafters.spec import Attention, Backbone, DrafterSpec, Head, Kind
from deepspec.targets.shapes import TargetShapes


@dataclass(frozen=True)
class KindEntry:
    kind: Kind
    title: str  # display name ("DSpark"); also names the `hf` export architecture
    drafter_class: str  # "module:Class" imported when a drafter is built
    # family: True = parallel block drafter (anchor + mask slots, packed anchors, `distill_losses`);
    # False = autoregressive (whole sequences, training-time test, soft CE, any number of drafts per round)
    parallel_blocks: bool
    fixed_num_layers: Optional[int]  # a kind with exactly this many draft layers (Eagle3: 1)
    calibrated_confidence: bool  # exports warn when its confidence head has no STS temperatures
    prunes_vocab: bool  # honours drafter.draft_vocab_size (a frequency-pruned draft vocabulary)
    engine_method: str  # vLLM `method` / SGLang algorithm (upper-cased) of the default export layout
    engine_layer_field: str  # config.json field vLLM/SGLang read the tapped layer ids from
    quickstart_recipe: str  # recipe `deepspec quickstart --compare` trains this kind with
    v4_class: Optional[str] = None  # "module:Class" used instead with drafter.backbone=v4

    @property
    def hf_architecture(self) -> str:
        return f"DeepSpec{self.title}Drafter"

    def default_layer_ids(self, num_layers: int, m: int) -> list[int]:
        """Tapped target layers when drafter.layer_ids is empty ("layer k" = output of decoder layer k).

        Block drafters: m evenly spaced from 1 to L-3 (Qwen3, L=36, m=5: [1, 9, 17, 25, 33]).
        Autoregressive (Eagle3): low / middle / high = [2, L//2, L-3].
        """
        if num_layers < 4:
            raise ValueError(f"target has {num_layers} layers; default taps need at least 4 (set layer_ids)")
        if not self.parallel_blocks:
            return [2, num_layers // 2, num_layers - 3]
        lo, hi = 1, num_layers - 3
        if m == 1:
            return [hi]
        return [lo + round(i * (hi - lo) / (m - 1)) for i in range(m)]


_BLOCK_FIELD, _EAGLE_FIELD = "target_layer_ids", "eagle_aux_hidden_state_layer_ids"
KINDS: dict[Kind, KindEntry] = {
    Kind.dspark: KindEntry(
        Kind.dspark, "DSpark", "deepspec.drafters.dspark:DSparkDrafter", parallel_blocks=True,
        fixed_num_layers=None, calibrated_confidence=True, prunes_vocab=False, engine_method="dspark",
        engine_layer_field=_BLOCK_FIELD, quickstart_recipe="dspark_smollm2",
        v4_class="deepspec.drafters.v4:V4DSparkDrafter"),
    Kind.dflash: KindEntry(
        Kind.dflash, "DFlash", "deepspec.drafters.dflash:DFlashDrafter", parallel_blocks=True,
        fixed_num_layers=None, calibrated_confidence=False, prunes_vocab=False, engine_method="dspark",
        engine_layer_field=_BLOCK_FIELD, quickstart_recipe="dflash_smollm2",
        v4_class="deepspec.drafters.v4:V4DSparkDrafter"),
    Kind.eagle3: KindEntry(
        Kind.eagle3, "Eagle3", "deepspec.drafters.eagle3:Eagle3Drafter", parallel_blocks=False,
        fixed_num_layers=1, calibrated_confidence=False, prunes_vocab=True, engine_method="eagle3",
        engine_layer_field=_EAGLE_FIELD, quickstart_recipe="eagle3_smollm2"),
}


def kind_entry(kind_or_spec) -> KindEntry:
    """The registry entry of a kind name, a `DrafterSpec`, or a drafter (anything with `.spec.kind`)."""
    spec = getattr(kind_or_spec, "spec", kind_or_spec)
    name = getattr(spec, "kind", spec)
    try:
        return KINDS[Kind(name)]
    except ValueError:
        raise ValueError(f"drafter.kind={name!r}; choose one of {', '.join(KINDS)}") from None


def check_spec(spec: DrafterSpec) -> None:
    """The checks a spec must pass before any target is known (raises ValueError naming the key)."""
    entry = kind_entry(spec)
    for name, enum in (("head", Head), ("attention", Attention), ("backbone", Backbone)):
        value = getattr(spec, name)
        if value not in set(enum):
            raise ValueError(f"drafter.{name}={value!s}; choose one of {', '.join(enum)}")
    if entry.parallel_blocks:
        if spec.mask_token_id is None:
            raise ValueError(f"drafter.mask_token_id is required for kind={spec.kind!s}: set it to a token "
                             f"id the target never produces (tiny test models: vocab_size - 1)")
        if spec.block_size < 2:
            raise ValueError(f"drafter.block_size={spec.block_size}; a block needs at least 2 slots")
    if entry.fixed_num_layers is not None and spec.num_layers != entry.fixed_num_layers:
        raise ValueError(f"drafter.num_layers={spec.num_layers} for kind={spec.kind!s}; it has exactly "
                         f"{entry.fixed_num_layers} decoder layer(s) (set drafter.num_layers="
                         f"{entry.fixed_num_layers})")


def _import(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def build_drafter(spec: DrafterSpec, shapes: TargetShapes) -> nn.Module:
    """A fresh drafter of `spec.kind` in the target's shapes (call `attach_target` before use)."""
    entry = kind_entry(spec)
    if spec.backbone == Backbone.v4 and entry.v4_class:  # MoE + parallel-stream layers (docs/deepseek_v4.md)
        return _import(entry.v4_class)(spec, shapes)
    return _import(entry.drafter_class)(spec, shapes)
