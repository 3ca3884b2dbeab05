"""Run one benchmark: target-only and speculative decoding on the same prompts, in the same run.

Multi-turn benchmarks (mt-bench) are evaluated on every turn: turn i's prompt holds the user
turns 1..i and, between them, the TARGET-ONLY answers to the earlier turns (the target's own
history; identical to the speculative ones under greedy decoding). Both decoders then decode
the same turn-i prompts. Batches alternate which decoder runs first, so slow drifts of a
shared machine do not favour one side.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from deepspec.decoding.engine import (
    BudgetFn,
    Generation,
    RoundLog,
    Timings,
    generate_speculative,
    generate_target_only,
)
from deepspec.decoding.sampling import SamplingParams
from deepspec.eval.benchmarks import Benchmark
from deepspec.eval.metrics import (
    distribution_check,
    latency_metrics,
    match_metrics,
    merge_logs,
    round_metrics,
    speed_metrics,
)
from deepspec.targets.frozen import FrozenTarget


@dataclass
class DecodeSettings:
    """How both decoders run (from `eval.*`)."""

    max_new_tokens: int = 128
    sampling: SamplingParams = field(default_factory=SamplingParams)
    batch_size: int = 1
    block_size: int | None = None
    confidence_threshold: float | None = None
    budget_fn: BudgetFn | None = None
    sts_temperatures: torch.Tensor | None = None
    kernel: str = "auto"
    seed: int = 0
    thinking: bool = False  # chat templates' thinking switch (Qwen3): off, as the training data was rendered


@dataclass
class BenchmarkRun:
    """Everything measured on one benchmark (turn prompts in evaluation order)."""

    name: str
    block_size: int
    spec_tokens: list[list[int]] = field(default_factory=list)
    base_tokens: list[list[int]] = field(default_factory=list)
    spec_timings: Timings = field(default_factory=Timings)
    base_timings: Timings = field(default_factory=Timings)
    logs: list[RoundLog] = field(default_factory=list)
    conversations: int = 0
    batch_size: int = 1
    spec_latency_s: list[float] = field(default_factory=list)  # per request: batch start -> last token
    base_latency_s: list[float] = field(default_factory=list)

    @property
    def rounds(self) -> RoundLog:
        return merge_logs(self.logs)


def encode_chat(target: FrozenTarget, messages: list[dict], thinking: bool = False) -> list[int]:
    """Token ids of a chat rendered with the target's template, generation prompt appended.

    `thinking` is passed to templates as `enable_thinking` (Qwen3's switch; others ignore it):
    off by default, as regeneration renders the training answers.
    """
    text = target.render_chat(messages, add_generation_prompt=True, enable_thinking=thinking)
    return list(target.tokenizer(text, add_special_tokens=False)["input_ids"])


def answer_text(target: FrozenTarget, tokens: list[int]) -> str:
    eos = set(target.eos_token_ids)
    return target.tokenizer.decode([t for t in tokens if t not in eos], skip_special_tokens=True).strip()


def device_generator(target: FrozenTarget, seed: int) -> torch.Generator:
    """A seeded generator on the target's device (sampling on CUDA needs a CUDA generator)."""
    return torch.Generator(device=target.device).manual_seed(seed)


def decode_speculative(target, drafter, prompts, settings: DecodeSettings, generator) -> Generation:
    return generate_speculative(target, drafter, prompts, settings.max_new_tokens, settings.sampling,
                                target.eos_token_ids, block_size=settings.block_size,
                                confidence_threshold=settings.confidence_threshold, budget_fn=settings.budget_fn,
                                sts_temperatures=settings.sts_temperatures, generator=generator,
                                kernel=settings.kernel)


def decode_target_only(target, prompts, settings: DecodeSettings, generator) -> Generation:
    return generate_target_only(target, prompts, settings.max_new_tokens, settings.sampling, target.eos_token_ids,
                                generator=generator)


def warm_up(target: FrozenTarget, drafter, settings: DecodeSettings, target_only: bool = True) -> None:
    """One short generation of each decoder, so one-off costs do not land in the first timing
    (target-only decoding unless target_only=False; speculative decoding when a drafter is given)."""
    prompt = encode_chat(target, [{"role": "user", "content": "Hello"}], settings.thinking)
    short = DecodeSettings(**{**settings.__dict__, "max_new_tokens": 4})
    if target_only:
        decode_target_only(target, [prompt], short, device_generator(target, 0))
    if drafter is not None:
        decode_speculative(target, drafter, [prompt], short, device_generator(target, 0))


def run_benchmark(target: FrozenTarget, drafter, bench: Benchmark, settings: DecodeSettings,
                  progress: bool = True, baseline: bool = True) -> BenchmarkRun:
    """Decode every turn of every conversation with both decoders; return tokens, logs and timings.

    baseline=False runs speculative decoding only (calibration needs only its rounds); the
    history of later turns is then the speculative answers.
    """
    from tqdm.auto import tqdm

    K = int(settings.block_size or drafter.spec.block_size)
    result = BenchmarkRun(name=bench.name, block_size=K, conversations=len(bench.conversations),
                          batch_size=settings.batch_size)
    g_base = device_generator(target, settings.seed)
    g_spec = device_generator(target, settings.seed + 1)
    bar = tqdm(total=bench.num_turns, desc=f"eval {bench.name} batch {settings.batch_size}", unit="prompt",
               disable=not progress)
    convs = bench.conversations
    batch_index = 0
    for start in range(0, len(convs), settings.batch_size):
        batch = convs[start:start + settings.batch_size]
        history: list[list[dict]] = [[] for _ in batch]
        for turn in range(max(len(c) for c in batch)):
            rows = [i for i, c in enumerate(batch) if turn < len(c)]
            for i in rows:
                history[i].append({"role": "user", "content": batch[i][turn]})
            prompts = [encode_chat(target, history[i], settings.thinking) for i in rows]
            if not baseline:
                spec = decode_speculative(target, drafter, prompts, settings, g_spec)
                base = spec
            elif batch_index % 2 == 0:
                base = decode_target_only(target, prompts, settings, g_base)
                spec = decode_speculative(target, drafter, prompts, settings, g_spec)
            else:
                spec = decode_speculative(target, drafter, prompts, settings, g_spec)
                base = decode_target_only(target, prompts, settings, g_base)
            batch_index += 1
            result.spec_tokens.extend(spec.tokens)
            result.spec_timings.add(spec.timings)
            result.spec_latency_s.extend(spec.latency_s)
            result.logs.append(spec.rounds)
            if baseline:
                result.base_tokens.extend(base.tokens)
                result.base_timings.add(base.timings)
                result.base_latency_s.extend(base.latency_s)
            for i, tokens in zip(rows, base.tokens, strict=True):
                history[i].append({"role": "assistant", "content": answer_text(target, tokens)})
            bar.update(len(rows))
    bar.close()
    return result


def summarise(run: BenchmarkRun, sampling: SamplingParams) -> dict:
    """The per-benchmark block of summary.json (one batch size)."""
    spec_n = sum(len(t) for t in run.spec_tokens)
    base_n = sum(len(t) for t in run.base_tokens)
    out = {"prompts": len(run.base_tokens), "conversations": run.conversations, "block_size": run.block_size,
           "batch_size": run.batch_size}
    out.update(round_metrics(run.rounds, run.block_size))
    out.update(speed_metrics(run.spec_timings, spec_n, run.base_timings, base_n))
    out.update(latency_metrics(run.spec_latency_s, run.spec_tokens, run.spec_timings.total_s))
    out.update(latency_metrics(run.base_latency_s, run.base_tokens, run.base_timings.total_s, prefix="target_"))
    match = match_metrics(run.spec_tokens, run.base_tokens)
    if sampling.greedy:
        out.update(match)
        out["consistency"] = {"check": "greedy match", "greedy_match": match["greedy_match"]}
    else:  # sampled outputs differ draw by draw; compare their token distributions instead
        out.update({"greedy_match": None, "token_match_rate": None, "mismatches": []})
        out["consistency"] = {"check": "distribution", **distribution_check(run.spec_tokens, run.base_tokens)}
    return out


SWEEP_KEYS = ("speedup", "tau", "tok_s_per_request", "tok_s_total", "latency_p50_ms", "latency_p95_ms",
              "ms_per_token_p50", "ms_per_token_p95", "target_tok_s_per_request", "target_tok_s_total",
              "target_latency_p50_ms", "target_latency_p95_ms", "target_ms_per_token_p50",
              "target_ms_per_token_p95", "greedy_match", "prompts")


def sweep_row(summary: dict, target_dtype: str) -> dict:
    """One row of benchmarks.<name>.sweep: the figures a concurrency comparison needs."""
    row = {"batch_size": summary["batch_size"], **{k: summary.get(k) for k in SWEEP_KEYS},
           "target_dtype": target_dtype}
    cons = summary.get("consistency") or {}
    if cons.get("check") == "distribution":
        row["distribution_p_value"] = cons.get("p_value")
    return row
