"""Capacity plan of the V4 DSpark drafters on 8x H100 nodes (what `deepspec plan` prints), Flash and Pro.

Run: python benchmarks/capacity_plan.py [--nodes 1 2 4 8] [--tokens 1240000000]
Per recipe and node count: trainable drafter parameters (built on the meta device), memory per GPU for
ZeRO stages 0-3 (model states + frozen embedding/LM head + activations), feature-cache bytes per token
and terabytes per storage dtype, and the expected cost. Figures come from deepspec/plan.py.
"""

from __future__ import annotations

import argparse

from deepspec.config import compose
from deepspec.plan import GIB, plan_from_config, report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="+", default=["dspark_v4_flash", "dspark_v4_pro"])
    ap.add_argument("--nodes", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--tokens", type=int, default=1_240_000_000)
    args = ap.parse_args()
    for recipe in args.recipes:
        cfg = compose([f"recipe={recipe}", f"plan.tokens={args.tokens}"])
        print(report(plan_from_config(cfg), recipe))
        print(f"\n{recipe}: total memory per GPU (GiB) by node count (8 GPUs per node, 80 GiB each)")
        print(f"  {'nodes':>5s} {'ZeRO-0':>9s} {'ZeRO-1':>9s} {'ZeRO-2':>9s} {'ZeRO-3':>9s} {'GPU-h/epoch':>12s}")
        for n in args.nodes:
            plan = plan_from_config(compose([f"recipe={recipe}", f"plan.tokens={args.tokens}", f"plan.nodes={n}"]))
            cells = [f"{plan['bytes_per_gpu'][f'zero{s}'] / GIB:8.1f}{'' if plan['per_stage'][f'zero{s}']['fits'] else '!'}"
                     for s in range(4)]
            print(f"  {n:5d} {' '.join(cells)} {plan['cost']['gpu_hours']:12,.0f}")
        print("  (! = does not fit in 80 GiB)\n")


if __name__ == "__main__":
    main()
