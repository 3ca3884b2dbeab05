"""Feature extraction throughput, cache bytes per token and storage round-trip error; with --vllm,
vLLM's extraction beside `transformers` on the same token ids.

    python benchmarks/features.py --sequences 16 --batch-tokens 4096
    DEEPSPEC_VLLM_VENV=/path/venv-vllm python benchmarks/features.py --vllm --dtype bfloat16 --sequences 16
    DEEPSPEC_VLLM_VENV=/path/venv-vllm python benchmarks/features.py --one-pass --dtype bfloat16 --sequences 16

On SmolLM2-135M-Instruct (CPU) with the DSpark SmolLM2 taps, using GSM8K problems with
their reference answers as conversations:
1. target feature-extraction tokens/s (tokenize + loss mask excluded; token-budgeted
   right-padded batches, as `deepspec data features` runs them);
2. bytes per token per storage dtype: the layout formula, the bytes measured on a shard
   written for these sequences, and DeepSpec's published 6 + 2·d·(m+1) (bf16);
3. round-trip error of each storage dtype on the real features: max over rows of
   max|x̂ - x| / max|x| (per token per layer) and the relative Frobenius error.

--vllm (benchmarks/vllm_features_compare.py): both engines load the same HF directory (the target
exported once) in --dtype, a local vLLM server runs deepspec's connector, and the script prints
feature tokens/s of each (alternating rounds), the error between them against bf16's own error,
and target passes per answer for regenerate-then-extract vs regenerate-and-extract on one server.

--one-pass (benchmarks/vllm_one_pass.py): the same GSM8K prompts answered (greedy, --max-new-tokens)
and extracted three ways: regenerate on a plain vLLM server then extract on a feature server (cold),
regenerate then extract right after on one feature server (its prefix cache), and
`features.regenerate=true` (one pass); target tokens computed per sequence token, wall and CPU seconds
of each, and the checks that the one pass gives the same answers, token ids and features.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from data_tools.cache import (  # noqa: E402
    STORAGE_DTYPES,
    EncodedSequence,
    bytes_per_token,
    decode,
    deepspec_bytes_per_token,
    encode,
    write_shard,
)
from data_tools.features import extract_features  # noqa: E402
from data_tools.sources import gsm8k_train_path  # noqa: E402
from data_tools.tokenize import ChatSequence, tokenize_chat  # noqa: E402
from deepspec.runs import format_table  # noqa: E402
from _common import add_target_args, load_cpu_target  # noqa: E402  (benchmarks/_common.py)

LAYERS = [1, 7, 14, 21, 27]  # DSpark defaults on a 30-layer target (m = 5)


def sequences(tokenizer, n: int) -> list[ChatSequence]:
    out = []
    with open(gsm8k_train_path()) as f:
        for line in f:
            if len(out) == n:
                break
            row = json.loads(line)
            msgs = [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]
            chat = tokenize_chat(tokenizer, msgs)
            out.append(ChatSequence(str(len(out)), "train", chat.input_ids, chat.loss_mask))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sequences", type=int, default=16)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--vllm", action="store_true", help="compare with vLLM's extraction ($DEEPSPEC_VLLM_VENV)")
    p.add_argument("--dtype", default="bfloat16", help="--vllm: dtype of both engines")
    p.add_argument("--rounds", type=int, default=2, help="--vllm: timed rounds per engine, alternating")
    p.add_argument("--final-state", default="auto", choices=("auto", "norm", "engine"),
                   help="--vllm: the final state from the target's norm of vLLM's last state (norm) or from the "
                        "model itself through deepspec's vLLM plugin (engine); as features.vllm_final_state")
    p.add_argument("--answers", type=int, default=4, help="--vllm: answers generated for the passes count")
    p.add_argument("--workdir", default="runs/features_vllm", help="--vllm: exported target, server log, files")
    p.add_argument("--block-size", type=int, default=None,
                   help="--vllm: vLLM's KV block size (prefix caching reuses whole blocks; CPU default 128)")
    p.add_argument("--one-pass", action="store_true",
                   help="regenerate-then-extract vs features.regenerate=true on one vLLM server ($DEEPSPEC_VLLM_VENV)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="--one-pass: answer length limit")
    p.add_argument("--concurrency", type=int, default=8, help="--one-pass: requests in flight")
    p.add_argument("--one-pass-first", action="store_true", help="--one-pass: run the one pass before R and Eb")
    add_target_args(p)
    a = p.parse_args()
    if a.one_pass:
        from vllm_one_pass import one_pass_benchmark  # noqa: E402  (benchmarks/vllm_one_pass.py)

        one_pass_benchmark(a, LAYERS)
        return
    if a.vllm:
        from vllm_features_compare import compare  # noqa: E402  (benchmarks/vllm_features_compare.py)

        compare(a, sequences, LAYERS)
        return
    target = load_cpu_target(a)
    seqs = sequences(target.tokenizer, a.sequences)
    tokens = sum(len(s.input_ids) for s in seqs)
    extract_features(target, LAYERS, seqs[:1], a.batch_tokens)  # warm-up
    t0 = time.perf_counter()
    feats = extract_features(target, LAYERS, seqs, a.batch_tokens)
    secs = time.perf_counter() - t0
    print(f"feature extraction: {len(seqs)} sequences, {tokens} tokens in {secs:.2f} s = "
          f"{tokens / secs:.1f} tokens/s (batch_tokens={a.batch_tokens}, taps {LAYERS})")

    m, d = len(LAYERS), target.hidden_size
    deepspec = deepspec_bytes_per_token(m, d)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in STORAGE_DTYPES:
            enc = [EncodedSequence.from_features(f, dtype) for f in feats]
            entry = write_shard(Path(tmp) / "shards" / f"{dtype}.safetensors", list(range(len(seqs))),
                                ["train"] * len(seqs), enc, dtype)
            x = torch.cat([torch.cat([f.taps_TMD, f.final_TD.unsqueeze(1)], 1) for f in feats]).float()
            y = decode(*encode(x, dtype))
            row_err = ((y - x).abs().amax(-1) / x.abs().amax(-1).clamp_min(1e-30)).max().item()
            frob = ((y - x).norm() / x.norm()).item()
            rows.append({"dtype": dtype, "bytes_per_token": bytes_per_token(m, d, dtype),
                         "measured": entry["bytes"] / tokens, "vs_deepspec_bf16": bytes_per_token(m, d, dtype) / deepspec,
                         "max_row_rel_err": row_err, "rel_frobenius_err": frob})
    rows.append({"dtype": "DeepSpec bf16 (6+2d(m+1))", "bytes_per_token": deepspec, "measured": "-",
                 "vs_deepspec_bf16": 1.0, "max_row_rel_err": "-", "rel_frobenius_err": "-"})
    print(format_table(rows))


if __name__ == "__main__":
    main()
