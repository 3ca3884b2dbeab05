"""Does a drafter learn the same from vLLM's features as from transformers'? Held-out simulated tau
after N training steps on a cache written by each engine (bf16 both sides), beside the seed noise.

    DEEPSPEC_VLLM_VENV=/path/venv-vllm python benchmarks/vllm_features_tau.py --input runs/qs/regenerate \\
        --steps 30 [--recipe quickstart_smollm2] [--workdir runs/vllm_tau]

`--input` is a `deepspec data regenerate` folder. The script runs the ordinary commands:
`deepspec data features` twice (transformers; features.source=vllm with a local vLLM server), both
with target.dtype=bfloat16, then `deepspec train` for N steps on each cache with seed 0 and on the
transformers cache with seed 1 (the noise a seed alone makes), and prints the final held-out
simulated tau and loss of each run. Reruns reuse finished stages (their summary.json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def deepspec(args: list[str], out: Path) -> dict:
    """Run `deepspec ARGS output_dir=OUT` unless OUT already holds its summary; return the summary."""
    summary = out / "summary.json"
    if not summary.exists():
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "deepspec", *args, f"output_dir={out}"]
        print("$ " + " ".join(cmd[2:]), flush=True)
        with open(out.parent / f"{out.name}.log", "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise SystemExit(f"{' '.join(args[:2])} failed ({rc}); see {out.parent / f'{out.name}.log'}")
        print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads(summary.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="a `deepspec data regenerate` output folder")
    p.add_argument("--recipe", default="quickstart_smollm2")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--workdir", default="runs/vllm_tau")
    a = p.parse_args()
    work = Path(a.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    common = [f"recipe={a.recipe}", f"input={Path(a.input).resolve()}", "target.dtype=bfloat16", "features.dtype=bf16"]
    feats = {"transformers": deepspec(["data", "features", *common], work / "features_hf"),
             "vllm": deepspec(["data", "features", *common, "features.source=vllm"], work / "features_vllm")}
    runs = []
    for engine, seed in (("transformers", 0), ("vllm", 0), ("transformers", 1)):
        cache = work / ("features_hf" if engine == "transformers" else "features_vllm")
        s = deepspec(["train", f"recipe={a.recipe}", f"input={cache}", f"trainer.max_steps={a.steps}",
                      f"trainer.eval_every={a.steps}", "trainer.progress=false", f"seed={seed}"],
                     work / f"train_{engine}_seed{seed}")
        runs.append({"features": engine, "seed": seed, "steps": s["steps"],
                     "heldout_tau": round(s["final_simulated_tau"], 4), "heldout_loss": round(s["heldout_loss"], 4),
                     "train_s": round(s["train_time_s"])})
    print("feature caches: " + ", ".join(f"{k} {v['tokens']} tokens at {v['tokens_per_s']} tok/s"
                                         for k, v in feats.items()))
    cols = list(runs[0])
    print("  ".join(f"{c:>12}" for c in cols))
    for r in runs:
        print("  ".join(f"{r[c]!s:>12}" for c in cols))
    engines = abs(runs[1]["heldout_tau"] - runs[0]["heldout_tau"])
    seeds = abs(runs[2]["heldout_tau"] - runs[0]["heldout_tau"])
    print(f"held-out tau after {a.steps} steps: |vllm - transformers| = {engines:.4f} (same seed); "
          f"|seed 1 - seed 0| = {seeds:.4f} (transformers features): the engines differ "
          f"{'within' if engines <= max(seeds, 0.01) else 'BEYOND'} the seed noise")


if __name__ == "__main__":
    main()
