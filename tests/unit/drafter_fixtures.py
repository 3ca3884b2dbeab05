"""Tiny random llama / qwen3 targets for the drafter tests (built from configs, nothing downloaded)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from deepspec.drafters.packing import SequenceFeatures
from deepspec.targets.shapes import shapes_from_hf_config

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def tiny_target(family: str, seed: int = 0):
    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**TINY))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**TINY, head_dim=8))
    model.eval()
    return model, shapes_from_hf_config(model.config)


@torch.no_grad()
def target_features(model, ids_T: torch.Tensor, layer_ids: list[int], loss_mask_T=None) -> SequenceFeatures:
    """Run the tiny target and keep taps (output of layer k = hidden_states[k+1]) and the final hidden."""
    out = model(ids_T[None], output_hidden_states=True)
    hs = out.hidden_states
    taps = torch.stack([hs[k + 1][0] for k in layer_ids], dim=1)
    if loss_mask_T is None:
        loss_mask_T = torch.ones_like(ids_T, dtype=torch.bool)
    return SequenceFeatures(ids_T, loss_mask_T, taps, hs[-1][0])
