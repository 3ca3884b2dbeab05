"""The held-out curve of a `deepspec train` run: simulated τ and acceptance by position per evaluation.

    python benchmarks/train_curve.py RUN_DIR [RUN_DIR ...]

Reads RUN_DIR/metrics.jsonl and RUN_DIR/summary.json (what `deepspec train` writes) and prints,
per run, one row per held-out evaluation (step, loss, simulated τ, acceptance at positions
1..γ), then the gain over the initial evaluation and the training throughput.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def curve(run: Path) -> None:
    metrics = run / "metrics.jsonl"
    if not metrics.exists():
        raise SystemExit(f"{metrics} not found: pass the output_dir of a `deepspec train` run")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    held = [r for r in rows if r.get("kind") == "heldout"]
    if not held:
        raise SystemExit(f"{metrics} has no held-out evaluation (trainer.eval_every=0?)")
    print(f"## {run}")
    print(f"{'step':>6} {'loss':>8} {'sim. tau':>9}  acceptance by position")
    for r in held:
        acc = " ".join(f"{a:.2f}" for a in r["per_position_acceptance"])
        print(f"{r['step']:>6} {r['loss']:>8.4f} {r['simulated_tau']:>9.3f}  {acc}")
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    first, best = held[0]["simulated_tau"], max(r["simulated_tau"] for r in held)
    print(f"held-out simulated tau {first:.3f} -> best {best:.3f} (+{best - first:.3f}) in {held[-1]['step']} steps; "
          f"{summary.get('tokens_per_s') or 0:.0f} anchor tokens/s, train time {summary.get('train_time_s')} s")


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    for run in sys.argv[1:]:
        curve(Path(run))


if __name__ == "__main__":
    main()
