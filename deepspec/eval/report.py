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


def results_markdown(title: str, benchmarks: dict[str, dict], settings: dict,
                     calibration: dict | None = None, sweep: list[dict] | None = None) -> str:
    """The whole results.md: headline table, per-position acceptance, time per round, calibration."""
    rows = [{"benchmark": name, **b} for name, b in benchmarks.items()]
    lines = [f"# {title}", "", "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), "",
             markdown_table(rows, COLUMNS), ""]
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
