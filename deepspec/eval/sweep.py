"""The measured concurrency sweep, the memory probe and the baselines of `deepspec eval`.

Sweep: at each batch size B, every benchmark's prompts are decoded B at a time by the target
alone and with the drafter (the same prompts, the same batches: requests really share each forward
pass; a batch starts together and runs until its last request ends, as a static batch does).

Memory probe: before any drafter is loaded, the target alone decodes the first turns of the first
benchmark's first max(B) conversations; then the drafter is loaded and decodes the same prompts.
Each decode's peak is measured (deepspec.eval.memory).

Baselines: each further drafter runs the same sweep, its own target-only decodes alternating with
it as the main drafter's do, so every speedup is measured side by side in time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from torch import nn

from deepspec.drafters.registry import kind_entry
from deepspec.eval.benchmarks import KINDS, Benchmark
from deepspec.eval.evaluate import (
    BenchmarkRun,
    DecodeSettings,
    decode_speculative,
    decode_target_only,
    device_generator,
    encode_chat,
    run_benchmark,
    summarise,
    sweep_row,
    warm_up,
)
from deepspec.eval.memory import PeakMemory, drafter_kv_bytes, drafter_param_bytes, memory_row
from deepspec.runs import print0
from deepspec.targets.frozen import FrozenTarget

MTP = "mtp"  # eval.baselines entry: the V4 target's own MTP module as a one-token drafter


def probe_prompts(target: FrozenTarget, bench: Benchmark, batch_size: int, thinking: bool) -> list[list[int]]:
    """The first user turns of the first `batch_size` conversations (fewer when the benchmark has fewer)."""
    return [encode_chat(target, [{"role": "user", "content": conv[0]}], thinking)
            for conv in bench.conversations[:batch_size]]


def _max_len(prompts: list[list[int]], settings: DecodeSettings, block_size: int) -> int:
    return max(len(p) for p in prompts) + settings.max_new_tokens + block_size + 2  # as the engine sizes it


def measure_memory(target: FrozenTarget, load_drafter: Callable[[], nn.Module], bench: Benchmark, batch_size: int,
                   settings: DecodeSettings, warmup: bool = True) -> tuple[dict, nn.Module]:
    """(memory block of the summary, the loaded drafter): peak of target-only decoding before the
    drafter exists, then of speculative decoding with it, on the same batch."""
    prompts = probe_prompts(target, bench, batch_size, settings.thinking)
    if warmup:
        warm_up(target, None, settings)
    with PeakMemory(target.device) as base:
        decode_target_only(target, prompts, settings, device_generator(target, settings.seed))
    drafter = load_drafter()
    spec, K = _spec_peak(target, drafter, prompts, settings, warmup)
    row = memory_row(base, spec, drafter_param_bytes(drafter),
                     drafter_kv_bytes(drafter, len(prompts), _max_len(prompts, settings, K), target.device),
                     len(prompts), _max_len(prompts, settings, K))
    return row, drafter


def _spec_peak(target, drafter, prompts, settings: DecodeSettings, warmup: bool) -> tuple[PeakMemory, int]:
    if warmup:
        warm_up(target, drafter, settings, target_only=False)
    with PeakMemory(target.device) as spec:
        decode_speculative(target, drafter, prompts, settings, device_generator(target, settings.seed + 1))
    return spec, int(settings.block_size or drafter.spec.block_size)


def run_sweep(target: FrozenTarget, drafter: nn.Module, benches: list[Benchmark], sizes: list[int],
              settings: DecodeSettings, dtype: str, progress: bool = True) -> tuple[dict, list[BenchmarkRun]]:
    """Per benchmark: the full summary at sizes[0] plus `sweep` (one row per batch size), and the
    BenchmarkRuns at sizes[0] (generations, calibration)."""
    results: dict[str, dict] = {}
    first_runs: list[BenchmarkRun] = []
    for bench in benches:
        rows, first = [], None
        for size in sizes:
            bench_run = run_benchmark(target, drafter, bench, replace(settings, batch_size=size), progress=progress)
            summary = summarise(bench_run, settings.sampling)
            rows.append(sweep_row(summary, dtype))
            if first is None:
                first = summary
                first_runs.append(bench_run)
            if size > len(bench.conversations):
                print0(f"note: {bench.name} has {len(bench.conversations)} conversations, fewer than batch "
                       f"size {size}: that row's batches are not full (raise eval.max_prompts)")
        results[bench.name] = {**first, "kind": KINDS.get(bench.name), "sweep": rows}
    return results, first_runs


def _baseline_drafter(target: FrozenTarget, name: str) -> tuple[nn.Module, object]:
    """(drafter, STS temperatures or None) of an eval.baselines entry."""
    from deepspec.eval.setup import load_eval_drafter, load_sts, sts_path

    if name == MTP:
        from deepspec.eval.mtp import load_mtp_drafter

        return load_mtp_drafter(target), None
    return load_eval_drafter(target, name), load_sts(sts_path("auto", name))


def evaluate_baseline(target: FrozenTarget, name: str, benches: list[Benchmark], sizes: list[int],
                      settings: DecodeSettings, dtype: str, block_size: int | None, warmup: bool = True,
                      progress: bool = True) -> dict:
    """One eval.baselines entry through the same sweep: baselines.<name> of the summary.

    Same prompts, sampling, token budget, seed and dtype as the main drafter. Block size: the
    main run's fixed eval.block_size where this drafter can draft that many, else its own. A
    confidence threshold / scheduler applies only to a drafter with a confidence head (with its
    own sts.json when it has one).
    """
    drafter, sts = _baseline_drafter(target, name)
    notes = []
    entry = kind_entry(drafter)
    fits = not entry.parallel_blocks or (block_size or 0) <= drafter.spec.block_size
    K = block_size if block_size and fits and name != MTP else None
    if block_size and K is None and name != MTP:
        notes.append(f"eval.block_size={block_size} exceeds its block size {drafter.spec.block_size}: "
                     f"drafts {drafter.spec.block_size} per round")
    own = replace(settings, block_size=K, sts_temperatures=sts)
    if getattr(drafter, "confidence", None) is None and (settings.confidence_threshold is not None
                                                         or settings.budget_fn is not None):
        own = replace(own, confidence_threshold=None, budget_fn=None)
        notes.append("no confidence head: verifies every draft (no threshold / scheduler)")
    prompts = probe_prompts(target, benches[0], max(sizes), settings.thinking)
    spec_mem, K_used = _spec_peak(target, drafter, prompts, own, warmup)
    results, _ = run_sweep(target, drafter, benches, sizes, own, dtype, progress=progress)
    keep = ("tau", "speedup", "acceptance_rate", "greedy_match", "consistency", "sweep")
    out = {"draft": name, "kind": str(drafter.spec.kind), "block_size": K_used,
           "benchmarks": {b: {k: r.get(k) for k in keep} for b, r in results.items()},
           "memory": {"with_drafter_mb": spec_mem.peak_mb, "measured": spec_mem.what,
                      "drafter_param_mb": drafter_param_bytes(drafter) / 2**20,
                      "drafter_kv_mb": drafter_kv_bytes(drafter, len(prompts), _max_len(prompts, own, K_used),
                                                        target.device) / 2**20},
           "notes": notes}
    if name == MTP:
        out.update(kind="mtp", title="MTP-1 (the target's own MTP module, one draft per round)")
    if hasattr(drafter, "close"):
        drafter.close()
    return out
