"""`deepspec eval`: speculative decoding with target + draft on benchmark prompts (docs/engine.md)."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from deepspec.runs import format_table, print0


def run(cfg: DictConfig) -> dict:
    """τ, acceptance, speedup, latency and memory, across concurrency and against baselines.

    deepspec eval recipe=dspark_smollm2 draft=CKPT eval.batch_sizes=[1,4] eval.max_prompts=4 \
        eval.baselines=[CKPT2] output_dir=E

    Both decoders run in the same process on the same prompts (mt-bench: every turn, with the
    target's own earlier answers), at each batch size of eval.batch_sizes (default: eval.batch_size
    alone); a batch's requests really share each forward pass. Writes E/summary.json:
    benchmarks.<name> (τ, speedup, greedy match or the sampling distribution check, per-position
    acceptance, ... at the first batch size) with .sweep = one row per batch size {batch_size,
    speedup, tau, tok_s_per_request, tok_s_total, latency_p50_ms, latency_p95_ms, ms_per_token_p50,
    ms_per_token_p95, the target-only figures, target_dtype}; memory.{target_only_mb,
    with_drafter_mb, drafter_param_mb, drafter_kv_mb} (peak while decoding the largest batch);
    baselines.<name>.benchmarks.<bench>.{tau, speedup, sweep} for each eval.baselines entry (a
    drafter checkpoint, or `mtp`: a DeepSeek-V4 target's own MTP module drafting one token).
    Also E/results.md, E/speedup_vs_concurrency.png, E/acceptance_by_position.png,
    E/tau_by_benchmark.png, E/time_per_round.png, E/generations.jsonl; with a confidence head
    E/calibration/ (STS fitted on part of the rounds, scored on the rest, threshold sweep).
    Options: eval.temperature/top_p/top_k, eval.block_size (N, or auto: the gamma with the best
    expected tokens per unit time, from timed round costs and the acceptance of a short
    calibration pass on eval.auto_prompts held-apart prompts; printed, and recorded under
    block_size_auto), eval.target_dtype (target | auto | float32 | bfloat16; both decoders, one
    dtype for the whole sweep), eval.thinking (chat templates' thinking switch, default off),
    eval.confidence_threshold, eval.scheduler=algorithm1|topk with eval.sps_table=S/sps.json,
    eval.sts=auto|none|PATH, eval.kernel=auto|triton|reference.
    """
    from deepspec.config import section
    from deepspec.eval.benchmarks import load_benchmark
    from deepspec.eval.block_size import calibrate_block_size
    from deepspec.eval.calibrate import calibrate_rounds
    from deepspec.eval.metrics import merge_logs
    from deepspec.eval.report import (
        plot_acceptance,
        plot_concurrency,
        plot_tau,
        plot_time_breakdown,
        results_markdown,
    )
    from deepspec.eval.setup import (
        decode_settings,
        eval_target,
        load_eval_drafter,
        load_sts,
        make_budget_fn,
        parse_batch_sizes,
        parse_block_size,
        sts_path,
    )
    from deepspec.eval.sweep import evaluate_baseline, measure_memory, run_sweep

    ev = section(cfg, "eval")
    out = Path(cfg.output_dir)
    benches = [load_benchmark(name, ev.max_prompts) for name in ev.benchmarks]  # fail fast on a bad name
    sizes = parse_batch_sizes(ev.batch_sizes, ev.batch_size)
    baselines = [str(b) for b in ev.baselines]
    target, dtype, dtype_why = eval_target(cfg, batch_size=max(sizes))
    print0(f"target dtype while decoding: {dtype} ({dtype_why})")
    sts_file = sts_path(ev.sts, cfg.draft)
    settings = decode_settings(ev, make_budget_fn(ev.scheduler, ev.sps_table), load_sts(sts_file))
    memory, drafter = measure_memory(target, lambda: load_eval_drafter(target, cfg.draft), benches[0], max(sizes),
                                     settings, warmup=ev.warmup)
    drafter_kind = str(drafter.spec.kind)
    auto = None
    if parse_block_size(ev.block_size) == "auto":
        auto = calibrate_block_size(target, drafter, benches[0].name, len(benches[0].conversations),
                                    int(ev.auto_prompts), settings, progress=ev.progress)
        print0(auto.table())
        settings.block_size = auto.block_size
    fixed_block = settings.block_size if auto is None else None  # baselines keep their own block size on auto

    results, runs = run_sweep(target, drafter, benches, sizes, settings, dtype, progress=ev.progress)
    gen_path = out / "generations.jsonl"
    with gen_path.open("w") as gen_file:
        for bench_run in runs:
            for i, (s, t) in enumerate(zip(bench_run.spec_tokens, bench_run.base_tokens, strict=True)):
                gen_file.write(json.dumps({"benchmark": bench_run.name, "prompt": i, "spec": s, "target": t}) + "\n")
    del drafter
    baseline_results = {}
    for name in baselines:
        baseline_results[name] = evaluate_baseline(target, name, benches, sizes, settings, dtype, fixed_block,
                                                   warmup=ev.warmup, progress=ev.progress)

    K = runs[0].block_size
    calibration = calibrate_rounds(merge_logs([r.rounds for r in runs]), K, ev.thresholds, out / "calibration",
                                   ev.calibration_fit_fraction, ev.seed)
    plots = [plot_acceptance(out / "acceptance_by_position.png", results),
             plot_tau(out / "tau_by_benchmark.png", results),
             plot_time_breakdown(out / "time_per_round.png", results),
             plot_concurrency(out / "speedup_vs_concurrency.png", results, baseline_results)]
    settings_row = {"drafter": drafter_kind, "draft": cfg.draft, "block_size": K,
                    "temperature": ev.temperature, "top_p": ev.top_p, "top_k": ev.top_k,
                    "max_new_tokens": ev.max_new_tokens, "batch_sizes": sizes,
                    "scheduler": ev.scheduler, "confidence_threshold": ev.confidence_threshold,
                    "sts": str(sts_file) if sts_file else "none", "device": str(target.device),
                    "target_dtype": dtype, "target_dtype_reason": dtype_why, "thinking": ev.thinking,
                    "block_size_setting": str(ev.block_size), "baselines": baselines}
    ok_cal = calibration if calibration and "skipped" not in calibration else None
    (out / "results.md").write_text(results_markdown(
        f"deepspec eval: {target.name} + {drafter_kind}", results, settings_row, ok_cal,
        ok_cal["threshold_sweep"] if ok_cal else None, memory=memory, baselines=baseline_results) + "\n")

    _print_table(results, baseline_results, memory)
    taus = [b["tau"] for b in results.values() if b.get("tau") is not None]
    speedups = [b["speedup"] for b in results.values() if b.get("speedup") is not None]
    return {
        "benchmarks": results,
        "macro": {"tau": sum(taus) / len(taus) if taus else None,
                  "speedup": sum(speedups) / len(speedups) if speedups else None},
        "memory": memory,
        "baselines": baseline_results,
        "settings": settings_row,
        "target_dtype": dtype,
        "block_size_auto": auto.to_json() if auto else None,
        "target": target.identity(),
        "calibration": calibration,
        "files": {"results_md": str(out / "results.md"), "plots": [str(p) for p in plots],
                  "generations": str(gen_path)},
    }


def _print_table(results: dict, baselines: dict, memory: dict) -> None:
    rows = [{"benchmark": name, "batch": r["batch_size"], "tau": r.get("tau"), "speedup": r.get("speedup"),
             "tok/s/request": r.get("tok_s_per_request"), "tok/s total": r.get("tok_s_total"),
             "P50 ms": r.get("latency_p50_ms"), "P95 ms": r.get("latency_p95_ms"),
             "target P95 ms": r.get("target_latency_p95_ms"), "greedy_match": r.get("greedy_match")}
            for name, b in results.items() for r in b["sweep"]]
    print0(format_table(rows))
    for base, entry in baselines.items():
        rows = [{"baseline": base, "benchmark": name, "batch": r["batch_size"], "tau": r.get("tau"),
                 "speedup": r.get("speedup")}
                for name, b in entry["benchmarks"].items() for r in b["sweep"]]
        print0(format_table(rows))
    print0(f"peak memory ({memory['measured']}, batch {memory['batch_size']}): target only "
           f"{_mb(memory['target_only_mb'])}, with the drafter {_mb(memory['with_drafter_mb'])}; drafter "
           f"weights {_mb(memory['drafter_param_mb'])}, drafter KV {_mb(memory['drafter_kv_mb'])}")


def _mb(value) -> str:
    return "n/a" if value is None else f"{value:.1f} MB"
