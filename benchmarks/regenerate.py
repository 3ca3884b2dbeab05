"""Regeneration throughput of the `hf` engine: batch 1 against batched, on the real target.

    python benchmarks/regenerate.py --prompts 8 --batch 8 --max-new-tokens 32

Takes the first N GSM8K training problems (short single-turn prompts), regenerates them
with SmolLM2-135M-Instruct (greedy, CPU) once with batch_size=1 and once with
batch_size=B, and prints new tokens per second of each and the ratio. The first pass is
preceded by a short warm-up generation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from data_tools.hf_engine import HFEngine  # noqa: E402
from data_tools.prompts import normalise_row  # noqa: E402
from data_tools.regenerate import InputRow, SamplingSettings  # noqa: E402
from data_tools.sources import gsm8k_train_path  # noqa: E402
from deepspec.runs import format_table  # noqa: E402
from _common import add_target_args, load_cpu_target  # noqa: E402  (benchmarks/_common.py)


def gsm8k_rows(n: int) -> list[InputRow]:
    rows = []
    with open(gsm8k_train_path()) as f:
        for i, line in enumerate(f):
            if len(rows) == n:
                break
            row, _ = normalise_row(json.loads(line), "gsm8k", i)
            rows.append(InputRow(i, row["id"], "train", "gsm8k", row["messages"], {}))
    return rows


def timed(engine: HFEngine, rows: list[InputRow]) -> tuple[int, float]:
    t0 = time.perf_counter()
    tokens = sum(r.new_tokens for r in engine.generate_rows(rows))
    return tokens, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    add_target_args(p)
    a = p.parse_args()
    target = load_cpu_target(a)
    settings = SamplingSettings(max_new_tokens=a.max_new_tokens)
    rows = gsm8k_rows(a.prompts)
    timed(HFEngine(target, SamplingSettings(max_new_tokens=4), batch_size=1), rows[:1])  # warm-up
    results = []
    for batch in (1, a.batch):
        tokens, secs = timed(HFEngine(target, settings, batch_size=batch), rows)
        results.append({"batch_size": batch, "prompts": len(rows), "new_tokens": tokens, "seconds": secs,
                        "tokens_per_s": tokens / secs})
    print(format_table(results))
    print(f"batched / batch-1 throughput: {results[1]['tokens_per_s'] / results[0]['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
