"""`deepspec eval`: speculative decoding with target + draft on benchmark prompts (docs/engine.md)."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from deepspec.runs import format_table, print0


def run(cfg: DictConfig) -> dict:
    """τ, per-position acceptance, verify rate, tokens/s vs target-only, speedup and greedy match.

    deepspec eval recipe=dspark_smollm2 draft=CKPT eval.benchmarks=[gsm8k,mt-bench] eval.max_prompts=4 output_dir=E

    Both decoders run in the same process on the same prompts (mt-bench: every turn, with the
    target's own earlier answers). Writes E/summary.json (benchmarks.<name>.tau, .speedup,
    .greedy_match, .per_position_acceptance, ...), E/results.md, E/acceptance_by_position.png,
    E/tau_by_benchmark.png, E/time_per_round.png, E/generations.jsonl; with a confidence head also
    E/calibration/ (STS fitted on part of the rounds, scored on the rest, threshold sweep).
    Options: eval.temperature/top_p/top_k, eval.batch_size, eval.block_size,
    eval.confidence_threshold, eval.scheduler=algorithm1|topk with eval.sps_table=S/sps.json,
    eval.sts=auto|none|PATH, eval.kernel=auto|triton|reference.
    """
    from deepspec.config import section
    from deepspec.eval.benchmarks import load_benchmark
    from deepspec.eval.calibrate import calibrate_rounds
    from deepspec.eval.evaluate import run_benchmark, summarise, warm_up
    from deepspec.eval.metrics import merge_logs
    from deepspec.eval.report import plot_acceptance, plot_tau, plot_time_breakdown, results_markdown
    from deepspec.eval.setup import decode_settings, load_eval_drafter, load_sts, make_budget_fn, sts_path
    from deepspec.targets import target_from_config

    ev = section(cfg, "eval")
    out = Path(cfg.output_dir)
    benches = [load_benchmark(name, ev.max_prompts) for name in ev.benchmarks]  # fail fast on a bad name
    target = target_from_config(cfg)
    drafter = load_eval_drafter(target, cfg.draft)
    sts_file = sts_path(ev.sts, cfg.draft)
    settings = decode_settings(ev, make_budget_fn(ev.scheduler, ev.sps_table), load_sts(sts_file))
    if ev.warmup:
        warm_up(target, drafter, settings)

    results, runs = {}, []
    gen_path = out / "generations.jsonl"
    with gen_path.open("w") as gen_file:
        for bench in benches:
            bench_run = run_benchmark(target, drafter, bench, settings, progress=ev.progress)
            runs.append(bench_run)
            results[bench.name] = summarise(bench_run, settings.sampling)
            for i, (s, t) in enumerate(zip(bench_run.spec_tokens, bench_run.base_tokens, strict=True)):
                gen_file.write(json.dumps({"benchmark": bench.name, "prompt": i, "spec": s, "target": t}) + "\n")

    K = runs[0].block_size
    calibration = calibrate_rounds(merge_logs([r.rounds for r in runs]), K, ev.thresholds, out / "calibration",
                                   ev.calibration_fit_fraction, ev.seed)
    plots = [plot_acceptance(out / "acceptance_by_position.png", results),
             plot_tau(out / "tau_by_benchmark.png", results),
             plot_time_breakdown(out / "time_per_round.png", results)]
    settings_row = {"drafter": drafter.spec.kind, "draft": cfg.draft, "block_size": K,
                    "temperature": ev.temperature, "top_p": ev.top_p, "top_k": ev.top_k,
                    "max_new_tokens": ev.max_new_tokens, "batch_size": ev.batch_size,
                    "scheduler": ev.scheduler, "confidence_threshold": ev.confidence_threshold,
                    "sts": str(sts_file) if sts_file else "none", "device": str(target.device)}
    ok_cal = calibration if calibration and "skipped" not in calibration else None
    (out / "results.md").write_text(results_markdown(
        f"deepspec eval: {target.name} + {drafter.spec.kind}", results, settings_row, ok_cal,
        ok_cal["threshold_sweep"] if ok_cal else None) + "\n")

    _print_table(results)
    taus = [b["tau"] for b in results.values() if b.get("tau") is not None]
    speedups = [b["speedup"] for b in results.values() if b.get("speedup") is not None]
    return {
        "benchmarks": results,
        "macro": {"tau": sum(taus) / len(taus) if taus else None,
                  "speedup": sum(speedups) / len(speedups) if speedups else None},
        "settings": settings_row,
        "target": target.identity(),
        "calibration": calibration,
        "files": {"results_md": str(out / "results.md"), "plots": [str(p) for p in plots],
                  "generations": str(gen_path)},
    }


def _print_table(results: dict) -> None:
    rows = [{"benchmark": name, "tau": b.get("tau"), "speedup": b.get("speedup"),
             "spec tok/s": b.get("spec_tokens_per_s"), "target tok/s": b.get("target_tokens_per_s"),
             "greedy_match": b.get("greedy_match"),
             "per-position": [round(x, 2) if x is not None else None for x in b["per_position_acceptance"]]}
            for name, b in results.items()]
    print0(format_table(rows))
