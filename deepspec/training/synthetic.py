"""A feature source made by the target itself: random prompts, the target's own continuations.

Benchmarks and tests measure and exercise the trainer without a dataset on disk: sequence i
is `prompt_len` random tokens followed by `answer_len` tokens the target generates greedily
from them (the loss mask covers the answer), exactly the "drafter imitates the target" data
that regeneration produces. Features (taps and final hidden) come from one target forward
per batch and are memoised. Deterministic in (seed, i).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from deepspec.drafters.packing import SequenceFeatures


class TargetGeneratedSource:
    """`FeatureSource` of `num_sequences` target-generated sequences (see module docstring)."""

    def __init__(self, target, layer_ids: Sequence[int], num_sequences: int, prompt_len: int = 8,
                 answer_len: int = 24, seed: int = 0, vocab_limit: Optional[int] = None, greedy: bool = True):
        self.target, self.layer_ids = target, list(layer_ids)
        self.num_sequences, self.prompt_len, self.answer_len = num_sequences, prompt_len, answer_len
        self.seed, self.greedy = seed, greedy
        self.vocab_limit = vocab_limit or target.vocab_size
        self._cache: dict[int, SequenceFeatures] = {}
        self.identity = {"kind": "target-generated", "target": target.name, "seed": seed, "n": num_sequences,
                         "prompt_len": prompt_len, "answer_len": answer_len}

    def __len__(self) -> int:
        return self.num_sequences

    @torch.no_grad()
    def _make(self, i: int) -> SequenceFeatures:
        """One sequence at a time, so its features never depend on which batch asked for it."""
        dev = self.target.device
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        ids = torch.randint(0, self.vocab_limit, (1, self.prompt_len), generator=g).to(dev)
        for _ in range(self.answer_len):  # greedy (or seeded sampling) continuation, no KV cache: tiny targets
            logits = self.target.logits(self.target.forward(ids, self.layer_ids[:1]).final_BTD[:, -1])
            if self.greedy:
                nxt = logits.argmax(-1)
            else:
                g = torch.Generator(device=dev).manual_seed(self.seed * 1_000_003 + i + 7 * ids.shape[1])
                nxt = torch.multinomial(logits.float().softmax(-1), 1, generator=g)[:, 0]
            ids = torch.cat([ids, nxt[:, None]], dim=1)
        out = self.target.forward(ids, self.layer_ids)
        mask = torch.zeros(ids.shape[1], dtype=torch.bool, device=dev)
        mask[self.prompt_len:] = True
        return SequenceFeatures(ids[0], mask, out.taps_BTMD[0], out.final_BTD[0])

    def get_batch(self, indices: list[int]) -> list[SequenceFeatures]:
        bad = [i for i in indices if not 0 <= i < self.num_sequences]
        if bad:
            raise IndexError(f"sequence indices {bad} outside [0, {self.num_sequences})")
        for i in indices:
            if i not in self._cache:
                self._cache[i] = self._make(i)
        return [self._cache[i] for i in indices]

    def supervised_tokens(self, indices: list[int]) -> list[torch.Tensor]:
        return [s.input_ids_T[s.loss_mask_T] for s in self.get_batch(indices)]
