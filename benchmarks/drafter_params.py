"""Parameter counts of every drafter for SmolLM2-135M and Qwen3-4B shapes (built on the meta device).

Run: python benchmarks/drafter_params.py
Trainable = what the optimizer holds; frozen-shared = the target's embedding and LM head the
drafter borrows (never in parameters()/state_dict(), never in optimizer state).
"""

from __future__ import annotations

import torch

from deepspec.drafters import DrafterSpec, build_drafter
from deepspec.targets.shapes import TargetShapes

TARGETS = {
    "SmolLM2-135M": (TargetShapes(model_type="llama", num_layers=30, hidden_size=576, vocab_size=49152, num_heads=9,
                                  num_kv_heads=3, head_dim=64, intermediate_size=1536, rope_theta=100000.0), True),
    "Qwen3-4B": (TargetShapes(model_type="qwen3", num_layers=36, hidden_size=2560, vocab_size=151936, num_heads=32,
                              num_kv_heads=8, head_dim=128, intermediate_size=9728, rope_theta=1000000.0,
                              qk_norm=True), True),
}

DRAFTERS = {
    "dspark (markov r=256)": dict(kind="dspark", head="markov"),
    "dspark (rnn r=256)": dict(kind="dspark", head="rnn"),
    "dflash": dict(kind="dflash", head="none", confidence_head=False),
    "eagle3": dict(kind="eagle3", num_layers=1),
}


def count(module: torch.nn.Module) -> dict[str, int]:
    groups: dict[str, int] = {}
    for name, p in module.named_parameters():
        top = name.split(".")[0]
        groups[top] = groups.get(top, 0) + p.numel()
    return groups


def main() -> None:
    for target, (shapes, tied) in TARGETS.items():
        shared = shapes.vocab_size * shapes.hidden_size * (1 if tied else 2)
        print(f"\n{target}: L={shapes.num_layers} d={shapes.hidden_size} V={shapes.vocab_size} "
              f"(frozen shared embedding{' = LM head, tied' if tied else ' + LM head'}: {shared / 1e6:.1f} M)")
        print(f"  {'drafter':26s} {'trainable':>11s} {'frozen-shared':>14s} {'trainable/shared':>17s}  breakdown (M)")
        for label, kw in DRAFTERS.items():
            spec = DrafterSpec(mask_token_id=shapes.vocab_size - 1, **kw)
            with torch.device("meta"):
                drafter = build_drafter(spec, shapes)
            groups = count(drafter)
            total = sum(groups.values())
            parts = ", ".join(f"{k} {v / 1e6:.2f}" for k, v in groups.items())
            print(f"  {label:26s} {total / 1e6:10.2f}M {shared / 1e6:13.1f}M {total / shared:17.2f}  {parts}")
        print("  (eagle3 with a pruned draft vocabulary has the same trainable count: its LM head is the")
        print("   frozen slice of the target's rows; pruning only shrinks the LM-head matmul)")


if __name__ == "__main__":
    main()
