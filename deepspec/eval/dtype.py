"""The target's dtype during evaluation (`eval.target_dtype`), chosen from what the hardware runs fast.

Speculative decoding is lossless only against target-only decoding in the SAME dtype, so the
eval runs both decoders with the target (and the drafter) in one dtype and records it.
`auto` picks bfloat16 where it is fast: a CUDA device with bf16 support, or a CPU with AMX or
AVX512-BF16 instructions (there a bf16 forward over several tokens costs about half the
float32 one); float32 elsewhere, since CPUs without those instructions emulate bf16 slowly.
"""

from __future__ import annotations

from pathlib import Path

import torch

EVAL_DTYPES = ("auto", "target", "float32", "bfloat16", "float16")
_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The bf16 matrix instruction sets this CPU reports (Linux /proc/cpuinfo; [] where unknown)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text(errors="replace") if path.is_file() else ""
    words = set(cpuinfo.split())
    return [flag for flag in _BF16_CPU_FLAGS if flag in words]


def resolve_eval_dtype(setting: str, target_dtype: str, device: torch.device | str,
                       cpuinfo: str | None = None, batch_size: int = 1) -> tuple[str, str]:
    """(dtype name, why) for `eval.target_dtype=setting` on `device`; `target_dtype` is target.dtype.

    On a CPU `auto` picks bf16 only at batch 1: there speculative and target-only decoding give the
    same bf16 numbers bit for bit; at larger batches their padded KV caches differ and bf16
    rounding flips greedy tokens (measured: greedy match 0.50 at batch 8), so float32 is used.
    A concurrency sweep passes its largest batch size: one dtype for every row.
    """
    if setting not in EVAL_DTYPES:
        raise ValueError(f"eval.target_dtype={setting!r}; choose one of {EVAL_DTYPES}")
    if setting == "target":
        return target_dtype, f"target.dtype={target_dtype} (eval.target_dtype=target)"
    if setting != "auto":
        return setting, f"eval.target_dtype={setting}"
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "auto: this CUDA device supports bf16"
        return "float16", "auto: this CUDA device has no bf16; float16"
    if device.type == "cpu":
        flags = cpu_bf16_flags(cpuinfo)
        if flags and batch_size > 1:
            return "float32", (f"auto: this CPU has {'/'.join(flags)}, but at batch size {batch_size} bf16 "
                               "is not bit-exact against target-only decoding; float32")
        if flags:
            return "bfloat16", f"auto: this CPU has {'/'.join(flags)} (fast bf16 matmuls)"
        return "float32", ("auto: this CPU has no AMX/AVX512-BF16, where bf16 is emulated and slower than "
                           "float32; float32")
    return target_dtype, f"auto: no rule for device {device}; target.dtype={target_dtype}"
