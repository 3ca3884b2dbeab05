"""Target passes and seconds per answer: regenerate then extract vs one pass (`benchmarks/features.py --one-pass`).

One local vLLM server (deepspec's connector, `--block-size 32` as `features.regenerate=true` starts it,
--dtype, one core) answers the same N GSM8K prompts greedily (up to --max-new-tokens) three ways:

(R)  `deepspec data regenerate regen.engine=openai` against it (`run_regeneration` + `OpenAIEngine`);
(Eb) `deepspec data features features.source=vllm` on R's output right after it, on R's prefix cache;
(Ea) the same extraction on a cold prefix cache (what the two stages cost when they run apart);
(C)  `deepspec data features features.source=vllm features.regenerate=true` (`run_one_pass`).

Each phase sends its own `cache_salt`, so none reuses another's prefix cache except Eb (R's salt).
Prints per phase the target tokens computed (prompt tokens the prefix cache did not serve + generated
tokens but the last), per token of the training sequences written, wall seconds and CPU seconds (this
process and the server's), then (a) = R + Ea, (b) = R + Eb and (c) = C; then checks C against R + Ea:
the same answers and token ids, the features' relative error, and C's features against transformers'
on the same ids. Ends with `passes_a=... passes_b=... passes_c=... cpu_s_a=... cpu_s_b=... cpu_s_c=...`.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import psutil
import torch
from vllm_features_compare import rel_errors  # benchmarks/vllm_features_compare.py

from data_tools.cache import FeatureCache
from data_tools.features import extract_features, write_feature_cache
from data_tools.jsonl import iter_jsonl, write_jsonl_atomic
from data_tools.openai_engine import OpenAIEngine
from data_tools.regen_features import BLOCK_SIZE, OnePass, computed_tokens, run_one_pass
from data_tools.regenerate import SamplingSettings, run_regeneration
from data_tools.sources import gsm8k_train_path
from data_tools.tokenize import ChatSequence
from data_tools.vllm_features import VllmExtractor, local_server, vllm_layer_ids
from deepspec.export import engine_check as ec
from deepspec.runs import format_table
from deepspec.targets import load_target


class SaltedEngine(OpenAIEngine):
    """`OpenAIEngine` with a prefix-cache salt, counting the target tokens its requests computed."""

    def __init__(self, *args, salt: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.salt, self.computed = salt, 0

    def _payload(self, messages):
        return json.dumps({**json.loads(super()._payload(messages)), "cache_salt": self.salt}).encode()

    def _chat(self, messages, deadline):
        reply = super()._chat(messages, deadline)
        usage = reply.get("usage") or {}
        with self._lock:
            self.computed += computed_tokens(usage) + max(int(usage.get("completion_tokens") or 0) - 1, 0)
        return reply


def cpu_seconds() -> float:
    """CPU seconds of this process and its children alive now (the vLLM server and its workers)."""
    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def measured(fn):
    w0, c0 = time.perf_counter(), cpu_seconds()
    out = fn()
    return out, time.perf_counter() - w0, cpu_seconds() - c0


def write_prompts(path: Path, n: int) -> Path:
    rows = []
    with open(gsm8k_train_path()) as f:
        for line in f:
            if len(rows) == n:
                break
            rows.append({"id": f"gsm8k:{len(rows)}", "source": "gsm8k", "meta": {},
                         "messages": [{"role": "user", "content": json.loads(line)["question"]}]})
    write_jsonl_atomic(path, rows)
    return path


def one_pass_benchmark(a, layers: list[int]) -> None:
    torch.set_num_threads(a.threads or 1)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # one core for vLLM, as for torch here
    os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    work = Path(a.workdir).resolve() / f"one_pass_{uuid.uuid4().hex[:8]}"
    target_dir, _ = ec.ensure_target_dir(Path(a.workdir).resolve())
    target = load_target(str(target_dir), name="smollm2-135m-instruct", device="cpu", dtype=a.dtype)
    inp = write_prompts(work / "prompts.jsonl", a.sequences)
    settings = SamplingSettings(max_new_tokens=a.max_new_tokens, max_seq_len=2048)
    n, conc = a.sequences, a.concurrency
    print(f"{n} GSM8K prompts, greedy answers of up to {a.max_new_tokens} tokens, {a.dtype}, vLLM block size "
          f"{BLOCK_SIZE}, {conc} requests in flight, taps {layers} + final; work in {work}")
    t0 = time.perf_counter()
    with local_server(target_dir, vllm_layer_ids(layers, target.num_layers), work / "hs", dtype=a.dtype,
                      max_model_len=2049, log=work / "vllm_server.log",
                      extra=["--block-size", str(BLOCK_SIZE)]) as url:
        print(f"vLLM server ready in {time.perf_counter() - t0:.0f} s")
        model = VllmExtractor._served_model(url)
        warm = VllmExtractor([url], target, layers, cache_salt="warm-up")
        warm([ChatSequence("w", "train", list(range(100, 164)), [True] * 64)])
        phases = {}
        salt_r = uuid.uuid4().hex
        engine = SaltedEngine([url], model, settings, concurrency=conc, salt=salt_r)
        _, wall, cpu = measured(lambda: run_regeneration(inp, work / "r", engine, settings, progress=False))
        phases["R regenerate"] = (engine.computed, wall, cpu)
        for name, salt in (("Eb extract, R's prefix cache", salt_r), ("Ea extract, cold", uuid.uuid4().hex)):
            ex = VllmExtractor([url], target, layers, concurrency=conc, cache_salt=salt)
            folder = work / ("fb" if salt == salt_r else "fa")
            _, wall, cpu = measured(lambda ex=ex, folder=folder: write_feature_cache(
                work / "r", target, layers, folder, storage_dtype="bf16", max_seq_len=2048, progress=False,
                extractor=ex, engine="vllm"))
            phases[name] = (ex.stats["prompt_tokens"] - ex.stats["cached_tokens"], wall, cpu)
        one_pass = OnePass(VllmExtractor([url], target, layers, concurrency=conc, cache_salt=uuid.uuid4().hex),
                           target.tokenizer, settings, "bf16")
        summary, wall, cpu = measured(lambda: run_one_pass(inp, work / "c", one_pass, target, layers,
                                                           concurrency=conc, progress=False))
        p = summary["passes"]
        phases["C one pass: generate"] = (p["generate_tokens"], None, None)
        phases["C one pass: follow-up"] = (p["follow_up_tokens"], None, None)
        phases["C one pass"] = (p["generate_tokens"] + p["follow_up_tokens"], wall, cpu)
    two, one = FeatureCache(work / "fa"), FeatureCache(work / "c")
    tokens_two, tokens_one = two.manifest["tokens"], one.manifest["tokens"]
    rows = []
    for name, (computed, wall, cpu) in phases.items():
        tokens = tokens_one if name.startswith("C") else tokens_two
        rows.append({"phase": name, "target_tokens": computed, "sequence_tokens": tokens,
                     "passes_per_token": round(computed / tokens, 3), "wall_s": _r(wall), "cpu_s": _r(cpu)})
    print(format_table(rows))
    R, Eb, Ea, C = (phases[k] for k in ("R regenerate", "Eb extract, R's prefix cache", "Ea extract, cold",
                                        "C one pass"))
    modes = {"a": ("(a) regenerate, then extract cold", R, Ea, tokens_two),
             "b": ("(b) regenerate, then extract on the prefix cache", R, Eb, tokens_two),
             "c": ("(c) one pass (features.regenerate=true)", C, (0, 0.0, 0.0), tokens_one)}
    totals = {k: {"mode": name, "target_tokens": x[0] + y[0], "passes_per_token": round((x[0] + y[0]) / t, 3),
                  "wall_s": round(x[1] + y[1], 1), "cpu_s": round(x[2] + y[2], 1)}
              for k, (name, x, y, t) in modes.items()}
    print(format_table(list(totals.values())))
    answers_r = [r["messages"] for _, r in iter_jsonl(work / "r" / "regenerated.jsonl")]
    answers_c = [r["messages"] for _, r in iter_jsonl(work / "c" / "regenerated.jsonl")]
    same_answers = sum(x == y for x, y in zip(answers_r, answers_c, strict=True))
    ids = one.sequence_ids()
    same_ids = [i for i, j in zip(ids, two.sequence_ids(), strict=True)
                if torch.equal(one[i].input_ids_T, two[j].input_ids_T)]
    err = rel_errors([one[i] for i in same_ids], [two[i] for i in same_ids]) if same_ids else {}
    feats = [one[i] for i in ids]
    ref = extract_features(target, layers, [ChatSequence(str(i), "train", f.input_ids_T.tolist(),
                                                         f.loss_mask_T.tolist()) for i, f in zip(ids, feats,
                                                                                                 strict=True)])
    vs_hf = rel_errors(feats, ref)
    print(f"one pass vs regenerate-then-extract: {same_answers}/{len(answers_r)} identical answers, "
          f"{len(same_ids)}/{len(ids)} identical token sequences; features on those, max relative error "
          f"{max(err.values(), default=float('nan')):.4f}; one-pass features vs transformers ({a.dtype}) on the "
          f"same ids: max relative error {max(vs_hf.values()):.4f} ({', '.join(f'{k} {v:.4f}' for k, v in vs_hf.items())})")
    print(" ".join(f"passes_{k}={v['passes_per_token']}" for k, v in totals.items()) + " " +
          " ".join(f"cpu_s_{k}={v['cpu_s']}" for k, v in totals.items()))


def _r(x: float | None):
    return "-" if x is None else round(x, 1)
