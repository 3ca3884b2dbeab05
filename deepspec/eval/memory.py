"""What speculative decoding costs in memory: peak memory while decoding, and the drafter's own bytes.

Peak memory is measured, not estimated: on CUDA `torch.cuda.max_memory_allocated` (reset before
each measured decode); on a CPU the process's resident set size (RSS, from /proc/self/statm),
sampled every few milliseconds by a background thread while the decode runs, plus one reading
before and after. Large tensors are allocated with mmap and returned to the system when freed, so
the RSS of a later decode is not inflated by an earlier, larger one.

`deepspec eval` measures target-only decoding first, before any drafter is loaded, then
speculative decoding of the same prompts with the drafter loaded: the difference is what a
deployment adds (drafter weights, its KV state, the wider verification passes).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

MB = 1024 * 1024
_STATM = Path("/proc/self/statm")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int | None:
    """The process's resident set size now (Linux), None where /proc is unavailable."""
    try:
        return int(_STATM.read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


class PeakMemory:
    """Context manager: `peak_mb` of the block (CUDA allocated bytes on `device`, else process RSS).

    `what` says which of the two was measured (it lands in the summary beside the figure).
    """

    def __init__(self, device: torch.device | str, interval_s: float = 0.002):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.peak_bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def what(self) -> str:
        return "torch.cuda.max_memory_allocated" if self.device.type == "cuda" else "process RSS"

    @property
    def peak_mb(self) -> float | None:
        return None if self.peak_bytes is None else self.peak_bytes / MB

    def _sample(self) -> None:
        while not self._stop.is_set():
            now = rss_bytes()
            if now is not None:
                self.peak_bytes = max(self.peak_bytes or 0, now)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_bytes = rss_bytes()
            if self.peak_bytes is not None:
                self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
                self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
            return
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        now = rss_bytes()
        if now is not None:
            self.peak_bytes = max(self.peak_bytes or 0, now)


def _tensors(obj) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def drafter_param_bytes(drafter: nn.Module) -> int:
    """Bytes of the drafter's own weights and buffers (the target's embedding / LM head it borrows
    are not counted: they are the target's and shared)."""
    return sum(t.numel() * t.element_size() for t in drafter.state_dict().values())


def drafter_kv_bytes(drafter: nn.Module, batch_size: int, max_len: int, device) -> int:
    """Bytes of the drafter's decoding state (its KV cache and features) for `batch_size` requests of
    up to `max_len` tokens, as `new_state` allocates it."""
    state = drafter.new_state(batch_size, max_len, device)
    seen, total = set(), 0
    for value in vars(state).values():
        if isinstance(value, nn.Module):
            continue
        for t in _tensors(value):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def memory_row(target_only: PeakMemory, with_drafter: PeakMemory, param_bytes: int, kv_bytes: int,
               batch_size: int, max_len: int) -> dict:
    """The summary's `memory` block."""
    t, w = target_only.peak_mb, with_drafter.peak_mb
    return {"target_only_mb": t, "with_drafter_mb": w,
            "overhead_mb": (w - t) if t is not None and w is not None else None,
            "measured": target_only.what, "batch_size": batch_size, "max_len": max_len,
            "drafter_param_mb": param_bytes / MB, "drafter_kv_mb": kv_bytes / MB,
            "drafter_kv_bytes_per_token": kv_bytes / max(batch_size * max_len, 1)}
