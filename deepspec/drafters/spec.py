"""DrafterSpec: every option of a drafter, as the `drafter` Hydra config group's schema.

Only primitive / list / Optional fields, so the dataclass can be registered in Hydra's
ConfigStore as it is. `resolve_spec` turns the `None` defaults ("copy the target") into
concrete numbers for one target.

Mask token (DFlash/DSpark block inputs after the anchor): a token id whose embedding row
the target never produces. Recipes set it per target:
- SmolLM2 (vocab 49152): ids 0-16 are special tokens (`<|endoftext|>`, `<|im_start|>`,
  `<|im_end|>`, `<repo_name>`, `<reponame>`, `<file_sep>`, ...); the chat model emits
  0, 1, 2 but never the repository/file/jupyter markers, so the SmolLM2 recipe uses one of
  those unused special ids (checked against the tokenizer by the target adapter).
- DeepSeek-V4: 128799 (the published noise token).
- Tiny random test models: `vocab_size - 1`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional

from deepspec.choices import Choice
from deepspec.targets.shapes import TargetShapes, check_taps


class Kind(Choice):
    """Drafter kinds; each has one entry in deepspec/drafters/registry.py."""

    dspark = "dspark"
    dflash = "dflash"
    eagle3 = "eagle3"


class Head(Choice):
    """DSpark's sequential head over the block: low-rank Markov, its RNN variant, or none."""

    markov = "markov"
    rnn = "rnn"
    none = "none"


class Attention(Choice):
    """Packed training attention: flex on CUDA and sdpa elsewhere for `auto`."""

    auto = "auto"
    sdpa = "sdpa"
    flex = "flex"


class Backbone(Choice):
    """Draft decoder layer type (deepspec.drafters.layers.BACKBONES)."""

    llama = "llama"
    v4 = "v4"  # DeepSeek-V4 blocks: MoE, parallel residual streams, sliding-window shared-KV attention


KINDS = tuple(Kind)
ATTENTION = tuple(Attention)
HEADS = tuple(Head)


@dataclass
class DrafterSpec:
    """Drafter options. `None` means "take the target's value" (see `resolve_spec`)."""

    kind: Kind = Kind.dspark
    num_layers: int = 5  # draft decoder layers (Eagle3 uses 1)
    block_size: int = 7  # γ: DFlash/DSpark block inputs = anchor + γ-1 masks; Eagle3 draft steps
    mask_token_id: Optional[int] = None  # required for dflash/dspark (see module docstring)
    head: Head = Head.markov  # DSpark sequential head
    markov_rank: int = 256  # r of the Markov/RNN head
    confidence_head: bool = True  # DSpark: predict c_k = P(token k survives verification)
    confidence_uses_markov: bool = True  # confidence input [h_k; W1[x_{k-1}]] (else h_k only)
    layer_ids: list[int] = field(default_factory=list)  # tapped target layers; [] = default_layer_ids
    num_taps: int = 5  # m for the DFlash/DSpark default taps
    intermediate_size: Optional[int] = None
    num_heads: Optional[int] = None
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    # per-head q/k RMSNorm in the draft layers; None = the target's (Qwen3 yes, Llama no) for DFlash/DSpark,
    # none for Eagle3. vLLM/SGLang/llama.cpp DFlash/DSpark draft layers always have it, so
    # configs/drafter/{dspark,dflash}.yaml set it to true; their Eagle3 layer never has it.
    qk_norm: Optional[bool] = None
    ttt_steps: int = 7  # Eagle3 training-time-test unroll length
    ttt_decay: float = 0.8  # Eagle3 loss weight decay per step (weights ttt_decay**j)
    draft_vocab_size: Optional[int] = None  # Eagle3 vocabulary pruning; None = full vocab
    backbone: Backbone = Backbone.llama
    # backbone-specific options; v4: DeepseekV4Config fields (n_routed_experts, num_experts_per_tok,
    # n_shared_experts, moe_intermediate_size, hc_mult, q_lora_rank, o_groups, o_lora_rank, qk_rope_head_dim, ...)
    backbone_config: dict[str, Any] = field(default_factory=dict)
    sliding_window: Optional[int] = None  # block queries see only the last `sliding_window` ctx positions
    attention: Attention = Attention.auto  # packed training attention
    anchors_per_seq: int = 512  # DFlash/DSpark anchors sampled per training sequence
    max_seq_len: int = 4096  # Eagle3 training rows are truncated to this many tokens


def default_layer_ids(kind: str, num_layers: int, m: int = 5) -> list[int]:
    """Default tapped target layers of a kind (see `KindEntry.default_layer_ids`)."""
    from deepspec.drafters.registry import kind_entry

    return kind_entry(kind).default_layer_ids(num_layers, m)


def resolve_spec(spec: DrafterSpec, shapes: TargetShapes) -> DrafterSpec:
    """Check `spec` against the target and fill every `None`/empty default from `shapes`."""
    from deepspec.drafters.registry import check_spec, kind_entry

    check_spec(spec)
    if kind_entry(spec).parallel_blocks and not 0 <= spec.mask_token_id < shapes.vocab_size:
        raise ValueError(f"drafter.mask_token_id={spec.mask_token_id} is outside the target vocab "
                         f"[0, {shapes.vocab_size})")
    layer_ids = list(spec.layer_ids) or default_layer_ids(spec.kind, shapes.num_layers, spec.num_taps)
    check_taps(shapes, layer_ids)
    if kind_entry(spec).prunes_vocab and spec.draft_vocab_size is not None \
            and not 0 < spec.draft_vocab_size <= shapes.vocab_size:
        raise ValueError(f"drafter.draft_vocab_size={spec.draft_vocab_size} must lie in (0, {shapes.vocab_size}]")
    return replace(
        spec,
        layer_ids=layer_ids,
        intermediate_size=spec.intermediate_size or shapes.intermediate_size,
        num_heads=spec.num_heads or shapes.num_heads,
        num_kv_heads=spec.num_kv_heads or shapes.num_kv_heads,
        head_dim=spec.head_dim or shapes.head_dim,
    )
