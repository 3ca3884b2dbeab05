"""The target's sampling distribution: temperature, top-k and top-p applied to its logits.

Speculative decoding must reproduce exactly the distribution the target alone would sample
from, so the baseline and the verifier call the same function here. Convention: temperature
first, then top-k (keep the k largest logits), then top-p (keep the smallest set of tokens,
in descending probability, whose mass reaches p; the token crossing p is kept), then
renormalise. Temperature 0 means greedy: callers use argmax and never sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How the target samples. temperature 0 = greedy; top_k 0 and top_p 1.0 = off."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}; use 0 for greedy or a positive value")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}; it must lie in (0, 1] (1.0 turns it off)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}; use 0 to turn it off or a positive count")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def target_probs(logits_NV: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """float32 sampling distribution over the vocabulary for each row of `logits_NV` (any leading dims)."""
    if params.greedy:
        raise ValueError("target_probs: temperature 0 is greedy; take the argmax of the logits instead")
    logits = logits_NV.float() / params.temperature
    V = logits.shape[-1]
    if 0 < params.top_k < V:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_p.cumsum(-1) - sorted_p  # mass of strictly more probable tokens
        drop_sorted = mass_before >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def next_tokens(logits_BV: torch.Tensor, params: SamplingParams,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row: argmax when greedy, else a draw from `target_probs`."""
    if params.greedy:
        return logits_BV.argmax(-1)
    return torch.multinomial(target_probs(logits_BV, params), 1, generator=generator).squeeze(-1)
