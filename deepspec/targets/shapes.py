"""Shapes of a frozen target that drafters copy (the target family's layer geometry)."""

from __future__ import annotations

from dataclasses import dataclass, asdict


@dataclass(frozen=True)
class TargetShapes:
    """Geometry of a target model, read from its `transformers` config.

    Drafters build their decoder layers in the target family's shape from this, so a
    drafter never needs the target's config object itself.
    """

    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    qk_norm: bool = False  # Qwen3-style per-head RMSNorm on q and k
    max_position_embeddings: int = 8192
    num_streams: int = 1  # DeepSeek-V4 mHC residual streams (1 for ordinary models)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TargetShapes":
        return cls(**d)


def shapes_from_hf_config(config) -> TargetShapes:
    """Read TargetShapes from a `transformers` PretrainedConfig (llama, qwen3, deepseek_v4, ...)."""
    text = getattr(config, "text_config", None) or config
    hidden = int(text.hidden_size)
    heads = int(text.num_attention_heads)
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    inter = getattr(text, "intermediate_size", None) or getattr(text, "moe_intermediate_size", None) or 4 * hidden
    rope_theta = getattr(text, "rope_theta", None)
    if rope_theta is None:
        rope_params = getattr(text, "rope_parameters", None) or {}
        if isinstance(rope_params, dict):
            rope_theta = rope_params.get("rope_theta")
    model_type = str(getattr(text, "model_type", "unknown"))
    return TargetShapes(
        model_type=model_type,
        num_layers=int(text.num_hidden_layers),
        hidden_size=hidden,
        vocab_size=int(text.vocab_size),
        num_heads=heads,
        num_kv_heads=int(kv),
        head_dim=int(head_dim),
        intermediate_size=int(inter),
        rms_norm_eps=float(getattr(text, "rms_norm_eps", 1e-6) or 1e-6),
        rope_theta=float(rope_theta or 10000.0),
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        max_position_embeddings=int(getattr(text, "max_position_embeddings", 8192) or 8192),
        num_streams=int(getattr(text, "hc_mult", None) or getattr(text, "num_hyper_connections", None) or 1)
        if model_type == "deepseek_v4" else 1,
    )


def check_taps(shapes: TargetShapes, layer_ids, name: str = "the target") -> list[int]:
    """Tapped layer ids as ints, or a ValueError naming the bad one.

    A tap is the output of a decoder layer, never the final layer's: its `hidden_states` entry is
    already normalised. DeepSeek-V4 is the exception: its last layer still outputs the parallel
    residual streams (the stream-collapse head and the final norm come after), and the published
    V4 drafter taps it.
    """
    ids = [int(i) for i in layer_ids]
    if not ids:
        raise ValueError("no tapped layers given (drafter.layer_ids is empty after defaults)")
    top = shapes.num_layers if shapes.model_type == "deepseek_v4" else shapes.num_layers - 1
    for i in ids:
        if i == shapes.num_layers - 1 and i == top:
            raise ValueError(f"drafter.layer_ids: layer {i} is the final layer of {name} "
                             f"({shapes.num_layers} layers): its hidden_states entry is post-norm, never tap "
                             f"it (at most layer {top - 1})")
        if not 0 <= i < top:
            raise ValueError(f"drafter.layer_ids: tap layer {i} is out of range for {name}: valid taps are "
                             f"0..{top - 1}")
    return ids
