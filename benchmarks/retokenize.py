"""How often does re-tokenizing a regenerated answer's text change the token sequence the target
produced? (Why regeneration records the generated ids: data_tools/tokenize.py.)

    python benchmarks/retokenize.py --prompts 64 --max-new-tokens 256 [--benchmark gsm8k] [--dtype auto]

The target (the embedded SmolLM2 unless --target) answers the first N prompts greedily with the hf
regeneration engine; each answer's generated ids are compared with the ids the training pipeline would
get from the answer's text alone (the chat rendered with the template and tokenized, content span
only). Printed: the share of answers whose ids differ, the share of answer tokens at or after the
first difference (the tokens a drafter would learn shifted), and a few examples of the splits.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_tools.hf_engine import HFEngine  # noqa: E402
from data_tools.regenerate import SamplingSettings  # noqa: E402
from data_tools.tokenize import tokenize_chat  # noqa: E402


def prompts_of(benchmark: str, n: int) -> list[str]:
    from deepspec.eval.benchmarks import load_benchmark

    return [c[0] for c in load_benchmark(benchmark, n).conversations]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--benchmark", default="gsm8k", help="a shipped prompt set: gsm8k, mt-bench, humaneval, instruct")
    ap.add_argument("--target", default=None, help="a target source (default: the embedded SmolLM2)")
    ap.add_argument("--dtype", default="auto", help="auto: bf16 where the CPU has AVX512-BF16/AMX, else fp32")
    ap.add_argument("--batch", type=int, default=16)
    a = ap.parse_args()

    import torch

    from deepspec.export.engine_check import TARGET_SOURCE
    from deepspec.targets import load_target

    torch.set_num_threads(1)
    dtype = a.dtype
    target = load_target(a.target or TARGET_SOURCE, dtype="float32", device="cpu")
    settings = SamplingSettings(max_new_tokens=a.max_new_tokens, max_seq_len=2048)
    engine = HFEngine(target, settings, batch_size=a.batch, dtype=dtype)
    tok = target.tokenizer
    questions = prompts_of(a.benchmark, a.prompts)
    t0 = time.perf_counter()
    answers = []
    for i in range(0, len(questions), a.batch):
        chunk = questions[i:i + a.batch]
        prompts = [engine.prompt_ids([{"role": "user", "content": q}]) for q in chunk]
        answers += engine.generate(prompts)
    gen_s = time.perf_counter() - t0
    differ, tokens, shifted, examples = 0, 0, 0, []
    for q, (text, _, _, ids) in zip(questions, answers, strict=True):
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": text}]
        chat = tokenize_chat(tok, msgs)
        a0, a1 = chat.spans[0]
        retok = chat.input_ids[a0:a1]
        retok = retok[:-1] if retok and retok[-1] in tok.all_special_ids else retok
        own = tokenize_chat(tok, msgs, turn_ids=[ids])
        spliced = own.input_ids[own.spans[0][0]:own.spans[0][1]]
        tokens += len(ids)
        if retok != ids:
            differ += 1
            k = next((j for j, (x, y) in enumerate(zip(retok, ids, strict=False)) if x != y), min(len(retok), len(ids)))
            shifted += len(ids) - k
            if len(examples) < 5:
                examples.append((tok.convert_ids_to_tokens(ids[k:k + 3]), tok.convert_ids_to_tokens(retok[k:k + 2]),
                                 spliced[:len(ids)] == ids))
    print(f"{len(questions)} {a.benchmark} answers, {tokens} tokens, greedy, target {engine.dtype} "
          f"({gen_s:.0f} s to generate)")
    print(f"answers whose re-tokenized text differs from the generated ids: {differ} / {len(questions)} "
          f"({100 * differ / len(questions):.1f}%)")
    print(f"answer tokens at or after the first difference: {shifted} / {tokens} ({100 * shifted / max(tokens, 1):.1f}%)")
    for gen, re, ok in examples:
        print(f"  generated {gen} ... re-tokenized {re} ... recorded ids used by training: {ok}")


if __name__ == "__main__":
    main()
