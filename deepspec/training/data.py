"""Which sequences each rank trains on, step by step, reproducibly.

The data order is one endless stream: epoch e is a permutation of the dataset drawn from
(seed, e), and the epochs follow each other. Optimizer step s takes stream positions
[s*G, (s+1)*G) (G = global_batch) and cuts them into groups of `micro_batch`; group g goes
to rank g % world_size as its micro-batch g // world_size. Each rank reads only its own
groups (its data shard). A group's anchor-sampling generator is seeded from (seed, stream
position), so the same group draws the same anchors whichever rank trains it: one process
with gradient accumulation and several processes without it see exactly the same blocks,
and a resumed run sees exactly what the uninterrupted run saw. The data position is the
step (stream position s*G, epoch s*G // dataset size).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch


@dataclass(frozen=True)
class MicroBatchPlan:
    indices: list[int]  # dataset indices of this micro-batch's sequences
    seed: int  # seed of the anchor-sampling generator for this group


def steps_for_epochs(num_sequences: int, global_batch: int, epochs: float) -> int:
    """Optimizer steps that read `epochs` passes over the data (at least one)."""
    if num_sequences < 1:
        raise ValueError("the training data is empty: check input= and its train split")
    return max(1, round(epochs * num_sequences / global_batch))


@lru_cache(maxsize=4)
def epoch_permutation(num_sequences: int, seed: int, epoch: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(_mix(seed, epoch, -1))
    return tuple(torch.randperm(num_sequences, generator=g).tolist())


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def stream(num_sequences: int, seed: int, start: int, count: int) -> list[int]:
    """Dataset indices at stream positions [start, start + count)."""
    return [epoch_permutation(num_sequences, seed, p // num_sequences)[p % num_sequences]
            for p in range(start, start + count)]


def plan_step(num_sequences: int, global_batch: int, micro_batch: int, world_size: int, rank: int, seed: int,
              global_step: int) -> tuple[int, list[MicroBatchPlan]]:
    """(epoch, this rank's micro-batches) for 0-based optimizer step `global_step`."""
    start = global_step * global_batch
    plans = []
    for g in range(rank, global_batch // micro_batch, world_size):
        g0 = start + g * micro_batch
        plans.append(MicroBatchPlan(indices=stream(num_sequences, seed, g0, micro_batch), seed=_mix(seed, g0)))
    return start // num_sequences, plans


def eval_plan(num_sequences: int, eval_sequences: int, micro_batch: int, world_size: int, rank: int,
              seed: int) -> list[MicroBatchPlan]:
    """This rank's share of the first `eval_sequences` held-out sequences, with fixed anchors.

    Groups of `micro_batch` consecutive sequences are dealt to ranks like training groups, so
    the evaluated blocks do not depend on the number of ranks; every rank gets the same number
    of micro-batches (ZeRO-3 forwards are collective).
    """
    n = min(eval_sequences, num_sequences)
    size = micro_batch
    while size > 1 and n // size < world_size:
        size //= 2
    groups = n // size // world_size * world_size
    if groups == 0:
        raise ValueError(f"held-out evaluation needs at least {world_size} sequences (one per rank); the held-out "
                         f"split has {num_sequences} and trainer.eval_sequences={eval_sequences}")
    return [MicroBatchPlan(indices=list(range(g * size, (g + 1) * size)), seed=_mix(seed, 7919, g * size))
            for g in range(rank, groups, world_size)]
