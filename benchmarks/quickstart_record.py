"""Print (and optionally append to benchmarks/quickstart_runs.md) the figures of a `deepspec quickstart` run.

    python benchmarks/quickstart_record.py runs/quickstart_smollm2 [--append] [--note "machine, threads"]

Later changes compare their quickstart against the rows recorded here.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path


def _f(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def record(run_dir: Path, note: str) -> str:
    s = json.loads((run_dir / "summary.json").read_text())
    date = dt.datetime.fromtimestamp((run_dir / "summary.json").stat().st_mtime, dt.timezone.utc)
    lines = [f"## {date:%Y-%m-%d %H:%M} UTC — {run_dir} ({note})", "",
             "| benchmark | τ | speedup | greedy match | per-position acceptance |", "|---|---|---|---|---|"]
    for name, b in s["benchmarks"].items():
        ppa = ", ".join("–" if x is None else f"{x:.2f}" for x in (b.get("per_position_acceptance") or []))
        lines.append(f"| {name} | {b['tau']:.3f} | {b['speedup']:.3f}× | {b['greedy_match']:.2f} | {ppa} |")
    for kind, d in s["drafters"].items():
        lines.append(f"\n{kind}: held-out simulated τ {_f(d.get('initial_simulated_tau'))} → best "
                     f"{_f(d.get('best_simulated_tau'))} in {d.get('train_steps')} steps")
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in s["stage_seconds"].items())
    lines.append(f"\nstage times: {stages}; total {s['total_seconds']:.0f} s; regenerated {s['regenerated']}\n")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--append", action="store_true")
    ap.add_argument("--note", default="2-core CPU, OMP_NUM_THREADS=1")
    args = ap.parse_args()
    text = record(args.run_dir, args.note)
    print(text)
    if args.append:
        path = Path(__file__).with_name("quickstart_runs.md")
        prior = path.read_text() if path.exists() else "# deepspec quickstart runs\n\n"
        path.write_text(prior + text + "\n")


if __name__ == "__main__":
    main()
