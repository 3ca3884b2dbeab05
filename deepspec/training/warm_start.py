"""Warm start: a drafter's decoder layers begin as copies of the target's top decoder layers.

A DFlash/DSpark drafter maps the target's (fused) hidden states of the context plus the
block's mask embeddings to hidden states that the target's own final norm and LM head
read. The target's last layers already perform the last step of that map, so copying them
gives the drafter a start that speaks the LM head's language, instead of random weights.

Drafter layer i of n takes target layer ``L - n + i`` (the top n layers, in order). Every
drafter parameter whose name and shape match the target layer's is copied: the attention
projections (q/k/v/o; the k/v projections also project the context features, so those are
warm-started too), the MLP and both norms. Parameters the target layer does not have (e.g.
q/k norms a drafter adds for the serving engines, kept at their identity init) or whose
shape differs (Eagle3's first layer reads [embedding; hidden], twice the width) keep their
random init and are listed in the report. The drafter's final norm takes the target's.
"""

from __future__ import annotations

import torch
from torch import nn

from deepspec.runs import print0

MODES = ("none", "target")


def apply_warm_start(drafter: nn.Module, target, mode: str) -> dict | None:
    """``trainer.warm_start``: none (random init) or target (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"trainer.warm_start={mode!r}; choose one of {MODES}")
    if mode == "none":
        return None
    report = warm_start_from_target(drafter, *top_layers_of(target))
    kept = ", ".join(report["kept_random"]) or "none"
    print0(f"[train] warm start: drafter layers <- target layers {report['target_layers']} "
           f"({len(report['copied'])} tensors copied; left at their init: {kept})")
    return report


def top_layers_of(target) -> tuple[nn.ModuleList, nn.Module | None]:
    """(decoder layers, final norm or None) of a `FrozenTarget`'s model."""
    model = target.model
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    return decoder.layers, getattr(decoder, "norm", None)


@torch.no_grad()
def warm_start_from_target(drafter: nn.Module, target_layers: nn.ModuleList,
                           target_norm: nn.Module | None = None) -> dict:
    """Copy the target's top ``len(drafter.layers)`` layers into ``drafter.layers`` (see the module
    docstring); returns {"target_layers": [...], "copied": [names], "kept_random": [names]}."""
    layers = getattr(drafter, "layers", None)
    if layers is None or len(layers) == 0:
        raise ValueError(f"trainer.warm_start=target: {type(drafter).__name__} has no decoder layers "
                         f"to warm-start")
    n, L = len(layers), len(target_layers)
    if n > L:
        raise ValueError(f"trainer.warm_start=target: the drafter has {n} layers but the target only {L}")
    copied, kept = [], []
    for i, (mine, theirs) in enumerate(zip(layers, target_layers[L - n:], strict=True)):
        source = dict(theirs.named_parameters())
        hits = 0
        for name, p in mine.named_parameters():
            src = source.get(name)
            if src is not None and src.shape == p.shape:
                p.copy_(src.to(p.dtype))
                copied.append(f"layers.{i}.{name}")
                hits += 1
            else:
                kept.append(f"layers.{i}.{name}")
        if hits == 0:
            raise ValueError(f"trainer.warm_start=target: drafter layer {i} ({type(mine).__name__}) shares "
                             f"no parameter name and shape with target layer {L - n + i} "
                             f"({type(theirs).__name__}); this drafter/target pair cannot be warm-started: "
                             f"use trainer.warm_start=none")
    norm = getattr(drafter, "norm", None)
    if norm is not None and target_norm is not None and norm.weight.shape == target_norm.weight.shape:
        norm.weight.copy_(target_norm.weight.to(norm.weight.dtype))
        copied.append("norm.weight")
    return {"target_layers": list(range(L - n, L)), "copied": copied, "kept_random": kept}
