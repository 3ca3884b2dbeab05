"""Eval reports: a Markdown table (results.md) and PNG plots a person would rather see than read."""

from __future__ import annotations

from pathlib import Path

from deepspec.runs import pyplot, save_figure

COLUMNS = [
    ("benchmark", "benchmark"), ("prompts", "prompts"), ("tau", "τ"), ("acceptance_rate", "accept rate"),
    ("drafts_verified_per_round", "drafts/round"), ("spec_tokens_per_s", "spec tok/s"),
    ("target_tokens_per_s", "target tok/s"), ("speedup", "speedup"), ("greedy_match", "greedy match"),
]


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(title for _, title in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(row.get(key)) for key, _ in columns) + " |" for row in rows]
    return "\n".join([head, sep, *body])


SWEEP_COLUMNS = [
    ("benchmark", "benchmark"), ("batch_size", "batch"), ("tau", "τ"), ("speedup", "speedup"),
    ("tok_s_per_request", "tok/s per request"), ("tok_s_total", "tok/s total"),
    ("target_tok_s_total", "target tok/s total"), ("latency_p50_ms", "P50 ms"), ("latency_p95_ms", "P95 ms"),
    ("target_latency_p95_ms", "target P95 ms"), ("ms_per_token_p95", "P95 ms/token"),
    ("target_ms_per_token_p95", "target P95 ms/token"), ("greedy_match", "greedy match"),
    ("target_dtype", "dtype"),
]


def _sweep_rows(benchmarks: dict[str, dict]) -> list[dict]:
    return [{"benchmark": name, **row} for name, b in benchmarks.items() for row in b.get("sweep") or []]


def _memory_lines(memory: dict, baselines: dict) -> list[str]:
    rows = [{"what": "target only", "peak": memory.get("target_only_mb")},
            {"what": "target + drafter", "peak": memory.get("with_drafter_mb"),
             "params": memory.get("drafter_param_mb"), "kv": memory.get("drafter_kv_mb")}]
    rows += [{"what": f"target + {name}", "peak": b["memory"].get("with_drafter_mb"),
              "params": b["memory"].get("drafter_param_mb"), "kv": b["memory"].get("drafter_kv_mb")}
             for name, b in baselines.items()]
    return [f"## Memory (peak {memory.get('measured')} while decoding a batch of {memory.get('batch_size')}, "
            f"MB)", "",
            markdown_table(rows, [("what", "decoding"), ("peak", "peak MB"), ("params", "drafter weights MB"),
                                  ("kv", f"drafter KV MB ({memory.get('max_len')} tokens/request)")]), ""]


def _baseline_lines(benchmarks: dict[str, dict], baselines: dict) -> list[str]:
    rows = [{"drafter": "this drafter", "benchmark": name, **row}
            for name, b in benchmarks.items() for row in b.get("sweep") or []]
    for base, entry in baselines.items():
        rows += [{"drafter": entry.get("title", base), "benchmark": name, **row}
                 for name, b in entry["benchmarks"].items() for row in b.get("sweep") or []]
    notes = [f"- {base}: {note}" for base, entry in baselines.items() for note in entry.get("notes", [])]
    return ["## Against the baselines (same prompts, same settings)", "",
            markdown_table(rows, [("drafter", "drafter"), ("benchmark", "benchmark"), ("batch_size", "batch"),
                                  ("tau", "τ"), ("speedup", "speedup"), ("tok_s_per_request", "tok/s per request"),
                                  ("latency_p95_ms", "P95 ms"), ("greedy_match", "greedy match")]),
            "", *notes, ""]


def results_markdown(title: str, benchmarks: dict[str, dict], settings: dict,
                     calibration: dict | None = None, sweep: list[dict] | None = None,
                     memory: dict | None = None, baselines: dict | None = None) -> str:
    """The whole results.md: headline table, concurrency sweep, memory, baselines, per-position
    acceptance, time per round, calibration."""
    rows = [{"benchmark": name, **b} for name, b in benchmarks.items()]
    lines = [f"# {title}", "", "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), "",
             markdown_table(rows, COLUMNS), ""]
    sweep_rows = _sweep_rows(benchmarks)
    if sweep_rows:
        lines += ["## Concurrency sweep (measured: each batch's requests share every forward pass)", "",
                  "Latency: per request, from its batch's start to its last token (P50 / P95 over requests).",
                  "", markdown_table(sweep_rows, SWEEP_COLUMNS), ""]
    if memory:
        lines += _memory_lines(memory, baselines or {})
    if baselines:
        lines += _baseline_lines(benchmarks, baselines)
    sampled = {n: b["consistency"] for n, b in benchmarks.items()
               if (b.get("consistency") or {}).get("check") == "distribution"}
    if sampled:
        lines += ["## Consistency under sampling (token frequencies, speculative vs target-only)", "",
                  markdown_table([{"benchmark": n, **c} for n, c in sampled.items()],
                                 [("benchmark", "benchmark"), ("p_value", "chi-square p"),
                                  ("tv_distance", "TV distance"), ("dof", "dof")]), ""]
    K = max((len(b.get("per_position_acceptance") or []) for b in benchmarks.values()), default=0)
    if K:
        pos_cols = [("benchmark", "benchmark")] + [(f"p{k}", f"k={k}") for k in range(1, K + 1)]
        pos_rows = [{"benchmark": n, **{f"p{k + 1}": v for k, v in enumerate(b.get("per_position_acceptance") or [])}}
                    for n, b in benchmarks.items()]
        lines += ["## Per-position conditional acceptance", "", markdown_table(pos_rows, pos_cols), ""]
    t_rows = [{"benchmark": n, **(b.get("round_ms") or {}), "target_step_ms": b.get("target_step_ms"),
               "rounds": b.get("rounds")} for n, b in benchmarks.items()]
    lines += ["## Where the time goes (ms per round; target-only ms per step)", "",
              markdown_table(t_rows, [("benchmark", "benchmark"), ("rounds", "rounds"), ("draft", "draft"),
                                      ("verify", "verify"), ("other", "other"), ("target_step_ms", "target step")]),
              ""]
    mismatched = {n: b["mismatches"] for n, b in benchmarks.items() if b.get("mismatches")}
    if mismatched:
        lines += ["## Greedy mismatches (first divergence per prompt)", ""]
        for name, rows_ in mismatched.items():
            lines += [f"- {name}: " + "; ".join(f"prompt {m['prompt']} at token {m['position']}: spec "
                                                f"{m['spec_token']} vs target {m['target_token']}" for m in rows_)]
        lines.append("")
    if sweep:
        lines += ["## Confidence threshold sweep (held-out rounds replayed)", "",
                  markdown_table(sweep, [("threshold", "threshold"), ("tokens_verified_per_round", "drafts/round"),
                                         ("acceptance_rate", "accept rate"), ("expected_tau", "τ")]), ""]
    if calibration:
        o = calibration["overall"]
        lines += ["## Confidence calibration (STS fitted on held-out rounds, scored on the rest)", "",
                  f"Temperatures: {', '.join(f'{t:.3g}' for t in calibration['temperatures'])}", "",
                  markdown_table([{"metric": m, "before": o[f"{m}_before"], "after": o[f"{m}_after"]}
                                  for m in ("ece", "auc", "brier")],
                                 [("metric", "metric"), ("before", "raw"), ("after", "STS")]), ""]
    return "\n".join(lines)


def plot_acceptance(path: Path, benchmarks: dict[str, dict]) -> Path:
    """Per-position conditional acceptance, one line per benchmark."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, b in benchmarks.items():
        values = b.get("per_position_acceptance") or []
        pts = [(k + 1, v) for k, v in enumerate(values) if v is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=f"{name} (τ {_fmt(b.get('tau'))})")
    ax.set(xlabel="draft position k", ylabel="P(accept k | 1..k-1 accepted)", ylim=(0, 1.02),
           title="Acceptance by position")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_tau(path: Path, benchmarks: dict[str, dict]) -> Path:
    """τ per benchmark, with the speedup written on each bar."""
    plt = pyplot()
    names = list(benchmarks)
    taus = [benchmarks[n].get("tau") or 0.0 for n in names]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(names) + 2), 4))
    bars = ax.bar(names, taus, color="#4c72b0")
    for bar, n in zip(bars, names, strict=True):
        s = benchmarks[n].get("speedup")
        ax.annotate(f"{_fmt(s)}×" if s else "", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set(ylabel="τ (tokens per round, bonus included)", title="Acceptance length τ (speedup on top)")
    return save_figure(fig, path)


def plot_time_breakdown(path: Path, benchmarks: dict[str, dict]) -> Path:
    """Stacked ms per round (draft / verify / other) beside the target-only ms per step."""
    plt = pyplot()
    names = list(benchmarks)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(names) + 2), 4))
    bottom = [0.0] * len(names)
    for part, color in (("draft", "#dd8452"), ("verify", "#4c72b0"), ("other", "#937860")):
        vals = [(benchmarks[n].get("round_ms") or {}).get(part, 0.0) for n in names]
        ax.bar(names, vals, bottom=bottom, label=part, color=color, width=0.5)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.scatter(names, [benchmarks[n].get("target_step_ms") or 0.0 for n in names], color="black", marker="_",
               s=600, label="target-only step", zorder=3)
    ax.set(ylabel="ms", title="Time per speculative round")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_concurrency(path: Path, benchmarks: dict[str, dict], baselines: dict | None = None) -> Path:
    """Speedup (left) and total tokens/s (right) against concurrency: one line per benchmark, dashed
    for each baseline drafter; the right panel also shows the target alone (dotted)."""
    plt = pyplot()
    fig, (ax_s, ax_t) = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, b) in enumerate(benchmarks.items()):
        rows = b.get("sweep") or []
        color = colors[i % len(colors)]
        xs = [r["batch_size"] for r in rows]
        ax_s.plot(xs, [r.get("speedup") or float("nan") for r in rows], marker="o", color=color, label=name)
        ax_t.plot(xs, [r.get("tok_s_total") or float("nan") for r in rows], marker="o", color=color,
                  label=f"{name} speculative")
        ax_t.plot(xs, [r.get("target_tok_s_total") or float("nan") for r in rows], linestyle=":", color=color,
                  label=f"{name} target only")
        for j, (base, entry) in enumerate((baselines or {}).items()):
            brows = (entry["benchmarks"].get(name) or {}).get("sweep") or []
            ax_s.plot([r["batch_size"] for r in brows], [r.get("speedup") or float("nan") for r in brows],
                      marker="x", linestyle="--", color=color, alpha=0.8 - 0.2 * min(j, 2),
                      label=f"{name}, baseline {base}"[-48:])
    ax_s.axhline(1.0, color="grey", linewidth=0.8)
    ax_s.set(xscale="log", xlabel="concurrency (requests per batch)", ylabel="speedup over the target alone",
             title="Speedup vs concurrency")
    ax_t.set(xscale="log", xlabel="concurrency (requests per batch)", ylabel="tokens/s, all requests",
             title="Total throughput")
    for ax in (ax_s, ax_t):
        xs = sorted({r["batch_size"] for b in benchmarks.values() for r in b.get("sweep") or []})
        ax.set_xticks(xs or [1], [str(x) for x in xs] or ["1"])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)
