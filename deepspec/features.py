"""Target features as the trainer sees them: one sequence's features and the source interface.

deepspec defines the interface; `data_tools` implements it (a feature cache on disk, online
extraction from the resident target, or both) and registers its implementation, so
dependencies point one way: `data_tools` -> `deepspec`. The `deepspec` command line loads
`data_tools` before running a command (see `deepspec.cli.PLUGINS`); code that calls
`open_feature_splits` without the CLI imports `data_tools` first. Formats: docs/data.md.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch
from torch import Tensor

# bytes per stored value of each `features.dtype` (fp8 adds one fp32 scale per token and layer)
STORAGE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}


@dataclass
class SequenceFeatures:
    """One training sequence with the frozen target's features (T tokens, M taps, width D).

    input_ids_T (long), loss_mask_T (bool; assistant tokens), taps_TMD (tapped target layers,
    layer order = the drafter's layer_ids), final_TD (final hidden, post final norm, pre LM head).
    """

    input_ids_T: Tensor
    loss_mask_T: Tensor
    taps_TMD: Tensor
    final_TD: Tensor

    def to(self, device: torch.device | str, dtype: Optional[torch.dtype] = None) -> SequenceFeatures:
        """On `device`, the hidden states cast to `dtype` when given (ids and mask keep theirs)."""
        return SequenceFeatures(self.input_ids_T.to(device), self.loss_mask_T.to(device),
                                self.taps_TMD.to(device, dtype), self.final_TD.to(device, dtype))


class FeatureSource(Protocol):
    """What the trainer reads. A source may also offer `flush()` (write computed features before a
    checkpoint or a new epoch)."""

    identity: dict[str, Any]  # target, taps, storage dtype and max length the features belong to

    def __len__(self) -> int: ...

    def get_batch(self, indices: list[int]) -> list[SequenceFeatures]: ...

    def supervised_tokens(self, indices: list[int]) -> list[Tensor]:
        """The supervised (assistant) token ids of those sequences, without running the target."""
        ...


def final_dtype(dtype: str) -> str:
    """Storage dtype of the final hidden state when the taps are stored as `dtype`: at least 16 bits,
    because the target distribution p_t is computed from it (fp8 taps keep a bf16 final state)."""
    if dtype not in STORAGE_BYTES:
        raise ValueError(f"features.dtype={dtype!r}; choose one of {sorted(STORAGE_BYTES)}")
    return "bf16" if dtype == "fp8" else dtype


def bytes_per_token(num_taps: int, hidden: int, dtype: str) -> int:
    """Bytes one token costs in a feature cache: id (4) + mask (1) + M·D tap values + D final values
    (+ one fp32 scale per tap for fp8)."""
    final = STORAGE_BYTES[final_dtype(dtype)]
    scales = num_taps * 4 if dtype == "fp8" else 0
    return 4 + 1 + num_taps * hidden * STORAGE_BYTES[dtype] + hidden * final + scales


_PROVIDER: Optional[str] = None  # "module:function" implementing open_feature_splits


def register_feature_provider(target: str) -> None:
    """Name the function ("module:function") that opens feature sources; imported on first use."""
    global _PROVIDER
    _PROVIDER = target


def open_feature_splits(input_path, target, layer_ids: Sequence[int], mode: str, splits: Sequence[str],
                        **options) -> tuple[FeatureSource, ...]:
    """One `FeatureSource` per split of `input_path` (a regenerate output or a feature cache), opened by
    the registered provider with `options` (max_seq_len, cache_dir, storage_dtype, batch_tokens, ...)."""
    if _PROVIDER is None:
        raise RuntimeError("no feature-source implementation is registered: `import data_tools` first "
                           "(the deepspec command line does)")
    module, name = _PROVIDER.split(":")
    opener = getattr(importlib.import_module(module), name)
    return opener(input_path, target, layer_ids, mode=mode, splits=splits, **options)
