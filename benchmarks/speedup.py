"""Speculative vs target-only decoding on the embedded SmolLM2 (CPU): tokens/s, τ, speedup, and where
a round's time goes (draft, verify, overhead), measured in the same process on the same prompts.

    python benchmarks/speedup.py --draft runs/dspark/checkpoints/final --prompts 4 --max-new-tokens 64
    python benchmarks/speedup.py            # no --draft: an UNTRAINED drafter (τ ≈ 1; shows overheads)

Prints figures only; `deepspec eval` is the full report (summary.json, plots, calibration).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="dspark_smollm2")
    parser.add_argument("--draft", default=None, help="checkpoint dir; omitted = untrained drafter of the recipe")
    parser.add_argument("--benchmark", default="gsm8k")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 on a shared, busy machine)")
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides key=value")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from deepspec.config import compose, section
    from deepspec.decoding.sampling import SamplingParams
    from deepspec.drafters import build_drafter
    from deepspec.drafters.io import save_drafter
    from deepspec.eval.benchmarks import load_benchmark
    from deepspec.eval.evaluate import DecodeSettings, run_benchmark, summarise, warm_up
    from deepspec.eval.setup import load_eval_drafter
    from deepspec.runs import format_table
    from deepspec.targets import target_from_config

    cfg = compose([f"recipe={args.recipe}", *args.overrides])
    target = target_from_config(cfg)
    draft, note = args.draft, ""
    if draft is None:
        torch.manual_seed(0)
        draft = tempfile.mkdtemp(prefix="untrained_draft_")
        save_drafter(draft, build_drafter(section(cfg, "drafter"), target.shapes))
        note = " (UNTRAINED drafter: τ near 1, so this measures the overheads, not a trained speedup)"
    drafter = load_eval_drafter(target, draft)
    settings = DecodeSettings(max_new_tokens=args.max_new_tokens, sampling=SamplingParams(args.temperature),
                              batch_size=args.batch_size, block_size=args.block_size)
    warm_up(target, drafter, settings)
    bench = load_benchmark(args.benchmark, args.prompts)
    result = summarise(run_benchmark(target, drafter, bench, settings), settings.sampling)

    r = result["round_ms"]
    round_ms = r["draft"] + r["verify"] + r["other"]
    print(f"\n{target.name} + {drafter.spec.kind} (block {result['block_size']}) on {bench.name}, "
          f"{result['prompts']} prompts x {args.max_new_tokens} tokens, T={args.temperature}, "
          f"batch {args.batch_size}, {torch.get_num_threads()} threads{note}")
    print(format_table([
        {"decoder": "target-only", "tokens": result["target_tokens"], "seconds": result["target_seconds"],
         "tokens/s": result["target_tokens_per_s"], "ms/step": result["target_step_ms"]},
        {"decoder": "speculative", "tokens": result["spec_tokens"], "seconds": result["spec_seconds"],
         "tokens/s": result["spec_tokens_per_s"], "ms/step": round_ms},
    ]))
    print(f"\nspeedup {result['speedup']:.3f}x   tau {result['tau']:.3f}   acceptance rate "
          f"{result['acceptance_rate']:.3f}   greedy match {result['greedy_match']}")
    print(f"per round: draft {r['draft']:.1f} ms ({100 * r['draft'] / round_ms:.0f}%), verify {r['verify']:.1f} ms "
          f"({100 * r['verify'] / round_ms:.0f}%), other {r['other']:.1f} ms ({100 * r['other'] / round_ms:.0f}%)")
    print(f"verify pass / target-only step: {r['verify'] / result['target_step_ms']:.2f}x for "
          f"{result['tokens_per_verify']:.1f} tokens; break-even tau = round / step = "
          f"{round_ms / result['target_step_ms']:.2f}")
    print("per-position acceptance: " + ", ".join("-" if a is None else f"{a:.2f}"
                                                 for a in result["per_position_acceptance"]))


if __name__ == "__main__":
    main()
