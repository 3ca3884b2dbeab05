"""Tiny llama / qwen3 targets (tests/tiny.py) and their features for the drafter tests."""

from __future__ import annotations

import torch

from deepspec.features import SequenceFeatures
from tests.tiny import tiny_target as make_tiny_target


def tiny_target(family: str, seed: int = 0):
    """(the bare `transformers` model, its TargetShapes) of a tiny target with a 96-token vocabulary."""
    target = make_tiny_target(family, seed=seed, vocab_size=96)
    return target.model, target.shapes


@torch.no_grad()
def target_features(model, ids_T: torch.Tensor, layer_ids: list[int], loss_mask_T=None) -> SequenceFeatures:
    """Run the tiny target and keep taps (output of layer k = hidden_states[k+1]) and the final hidden."""
    out = model(ids_T[None], output_hidden_states=True)
    hs = out.hidden_states
    taps = torch.stack([hs[k + 1][0] for k in layer_ids], dim=1)
    if loss_mask_T is None:
        loss_mask_T = torch.ones_like(ids_T, dtype=torch.bool)
    return SequenceFeatures(ids_T, loss_mask_T, taps, hs[-1][0])
