"""Warm start from the target vs random init, DSpark and DFlash, at equal steps and data.

    python benchmarks/warm_start.py --input runs/gsm8k/regen --out runs/warm_start --steps 60 --eval-every 20

Builds the target-feature cache of --input once (`deepspec data features`, bf16 target), then
trains `dspark_smollm2` and `dflash_smollm2` twice each from that cache with the same seed,
data order, steps and learning rate: `trainer.warm_start=none` (random init) and `target` (the
drafter's layers start as the target's top layers). Prints the held-out simulated τ and
position-1 acceptance at every evaluation, side by side. Each run is resumable and skipped
when its summary exists (rerun the same command after an interruption). --jobs 2 runs two
trainings at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RUNS = [(kind, init) for kind in ("dspark", "dflash") for init in ("none", "target")]


def run(cmd: list[str], log: Path) -> None:
    with open(log, "a") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")


def heldout(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r for r in rows if r.get("kind") == "heldout"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="a `deepspec data regenerate` folder or its JSONL")
    p.add_argument("--out", default="runs/warm_start")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--eval-sequences", type=int, default=16)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--extra", nargs="*", default=[], help="more overrides for every training run")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    features = out / "features"
    if not (features / "manifest.json").exists():
        print(f"building the feature cache in {features}", flush=True)
        run(["deepspec", "data", "features", "recipe=dspark_smollm2", f"input={a.input}",
             f"output_dir={features}", "target.dtype=bfloat16", "data.max_seq_len=512"], out / "features.log")

    def train(job: tuple[str, str]) -> Path:
        kind, init = job
        run_dir = out / f"{kind}_{init}"
        if not (run_dir / "summary.json").exists():
            run(["deepspec", "train", f"recipe={kind}_smollm2", f"input={features}", "features.source=cache",
                 f"output_dir={run_dir}", f"trainer.max_steps={a.steps}", f"trainer.eval_every={a.eval_every}",
                 f"trainer.eval_sequences={a.eval_sequences}", f"trainer.warm_start={init}",
                 "trainer.save_every=0", "trainer.progress=false", "resume=auto", *a.extra],
                out / f"{kind}_{init}.log")
        return run_dir

    with ThreadPoolExecutor(a.jobs) as pool:
        dirs = dict(zip(RUNS, pool.map(train, RUNS), strict=True))
    curves = {job: heldout(d) for job, d in dirs.items()}
    steps = sorted(set.intersection(*(set(c) for c in curves.values())))
    print(f"\nheld-out simulated τ (position-1 acceptance), equal steps and data; input {a.input}")
    print("| drafter | init | " + " | ".join(f"step {s}" for s in steps) + " |")
    print("|---|---|" + "---|" * len(steps))
    for (kind, init), c in curves.items():
        cells = [f"{c[s]['simulated_tau']:.3f} ({c[s]['per_position_acceptance'][0]:.2f})" for s in steps]
        label = "warm (target top layers)" if init == "target" else "random"
        print(f"| {kind} | {label} | " + " | ".join(cells) + " |")
    last = steps[-1]
    for kind in ("dspark", "dflash"):
        gain = curves[(kind, "target")][last]["simulated_tau"] - curves[(kind, "none")][last]["simulated_tau"]
        print(f"{kind}: warm - random at step {last}: {gain:+.3f} τ")


if __name__ == "__main__":
    sys.exit(main())
