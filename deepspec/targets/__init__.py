"""Frozen target adapters: load (embedded GGUF, local dir, hub cache, tiny random), tap layers."""

from __future__ import annotations

from typing import Any, Optional

from deepspec.targets.frozen import COLLAPSE_RULES, FrozenTarget, TargetOutput, collapse_streams
from deepspec.targets.loading import load_model, load_tokenizer, pick_device, torch_dtype
from deepspec.targets.shapes import TargetShapes, shapes_from_hf_config

__all__ = ["FrozenTarget", "TargetOutput", "TargetShapes", "COLLAPSE_RULES", "collapse_streams", "load_target",
           "target_from_config", "release_target", "shapes_from_hf_config"]


def load_target(source: str, name: Optional[str] = None, gguf_file: Optional[str] = None,
                tokenizer: Optional[str] = None, dtype: str = "float32", device: str = "auto",
                device_map: Optional[str] = None, stream_collapse: str = "mean",
                random_config: Optional[dict[str, Any]] = None, seed: int = 0,
                chat_template: Optional[str] = None, need_tokenizer: bool = True) -> FrozenTarget:
    """Load a frozen target. `source` forms are described in deepspec/targets/loading.py."""
    model = load_model(source, gguf_file, torch_dtype(dtype), device_map, random_config or {}, seed)
    if not device_map:
        model = model.to(pick_device(device))
    tok = None
    tok_source = tokenizer or (None if source.startswith("random:") else source)
    if tok_source and need_tokenizer:
        tok = load_tokenizer(tok_source, gguf_file if tok_source == source else None)
    if tok is not None and len(tok) > model.config.vocab_size:
        raise ValueError(f"tokenizer {tok_source} has {len(tok)} tokens but target {source} has vocab "
                         f"{model.config.vocab_size}: set target.random_config.vocab_size >= {len(tok)}")
    return FrozenTarget(model, tok, name=name or source, stream_collapse=stream_collapse,
                        chat_template=chat_template)


_LOADED: dict[str, FrozenTarget] = {}


def target_from_config(cfg, need_tokenizer: bool = True) -> FrozenTarget:
    """Build the target from the `target` section of a composed config.

    The target is frozen, so one process (e.g. `deepspec quickstart` running every stage)
    shares one loaded copy per distinct `target` section.
    """
    t = cfg.target
    key = f"{sorted((k, str(v)) for k, v in t.items())}|{need_tokenizer}"
    if key not in _LOADED:
        _LOADED.clear()  # keep at most one resident target
        _LOADED[key] = _load_from_section(t, need_tokenizer)
    return _LOADED[key]


def release_target(target: FrozenTarget) -> None:
    """Take `target` out of the shared cache: a caller about to change it in place (its dtype, its
    attention implementation) owns it from then on, and later stages load a fresh copy."""
    for key in [k for k, v in _LOADED.items() if v is target]:
        del _LOADED[key]


def _load_from_section(t, need_tokenizer: bool) -> FrozenTarget:
    target = load_target(source=t.source, name=t.name, gguf_file=t.gguf_file, tokenizer=t.tokenizer,
                         dtype=t.dtype,
                         device=t.device, device_map=t.device_map, stream_collapse=t.stream_collapse,
                         random_config=dict(t.random_config), seed=t.seed, chat_template=t.chat_template,
                         need_tokenizer=need_tokenizer)
    target.source = t.source
    return target
