"""The frozen SmolLM2 target in float32 vs bfloat16 on this CPU: speed and feature error.

    OMP_NUM_THREADS=1 python benchmarks/target_dtype_cpu.py

CPUs with AMX / AVX512-BF16 run bf16 matmuls several times faster than fp32. This measures,
side by side on the embedded SmolLM2-135M-Instruct (random token ids; what is timed does not
depend on the text):
1. prefill of 4 x 400 tokens (what `deepspec data features` and hybrid/online training run);
2. one decode step at batch 1 and a verify step of 8 tokens at batch 1 (speculative decoding);
3. the relative error of bf16 features against fp32 ones (tapped layers and final hidden),
   and how often the bf16 greedy next token differs from the fp32 one.
Prints one line per measurement and `prefill_speedup=... verify_speedup=... decode_speedup=...`.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from deepspec.targets import load_target  # noqa: E402

SOURCE = "embedded:smollm2-135m-instruct"
TAPS = [1, 8, 15, 22, 28]


def timed(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def measure(dtype: str, ids_BT: torch.Tensor) -> dict:
    target = load_target(SOURCE, dtype=dtype, device="cpu", need_tokenizer=False)
    model = target.model
    prefill = timed(lambda: target.forward(ids_BT, TAPS))
    ctx = ids_BT[:1, :300]
    cache = model(ctx, use_cache=True).past_key_values

    def step(n: int):
        model(ids_BT[:1, 300:300 + n], past_key_values=cache, use_cache=True)
        cache.crop(-n)  # drop what this step appended

    out = target.forward(ids_BT, TAPS)
    return {"prefill_s": prefill, "decode_s": timed(lambda: step(1), 5), "verify8_s": timed(lambda: step(8), 5),
            "taps": out.taps_BTMD.float(), "final": out.final_BTD.float(),
            "next": (out.final_BTD.float() @ target.lm_head_weight.float().T).argmax(-1)}


def main() -> None:
    torch.manual_seed(0)
    ids_BT = torch.randint(100, 40000, (4, 400))
    print(f"threads={torch.get_num_threads()} cpu_capability={torch.backends.cpu.get_cpu_capability()}")
    r = {dtype: measure(dtype, ids_BT) for dtype in ("float32", "bfloat16")}
    for key, label in (("prefill_s", "prefill 4x400"), ("decode_s", "decode 1 token"), ("verify8_s", "verify 8 tokens")):
        a, b = r["float32"][key], r["bfloat16"][key]
        print(f"{label:>16}: fp32 {a * 1e3:8.1f} ms  bf16 {b * 1e3:8.1f} ms  speedup {a / b:.2f}x")
    for key in ("taps", "final"):
        a, b = r["float32"][key], r["bfloat16"][key]
        print(f"{key:>16}: bf16 relative error {float((a - b).norm() / a.norm()):.2e}")
    flips = float((r["float32"]["next"] != r["bfloat16"]["next"]).float().mean())
    print(f"{'greedy next':>16}: bf16 differs from fp32 on {flips:.1%} of positions")
    for dtype in r:
        print(f"verify/decode cost ratio {dtype}: {r[dtype]['verify8_s'] / r[dtype]['decode_s']:.2f}")
    f, b = r["float32"], r["bfloat16"]
    print(f"prefill_speedup={f['prefill_s'] / b['prefill_s']:.2f} verify_speedup={f['verify8_s'] / b['verify8_s']:.2f} "
          f"decode_speedup={f['decode_s'] / b['decode_s']:.2f}")


if __name__ == "__main__":
    main()
