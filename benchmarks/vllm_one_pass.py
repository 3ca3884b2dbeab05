"""Target passes and seconds per answer: regenerate then extract vs one pass (`benchmarks/features.py --one-pass`).

The same N GSM8K prompts, answered greedily (up to --max-new-tokens) in --dtype by local vLLM servers
(`--block-size 32`, as `features.regenerate=true` starts its own; one core):

(R0) `deepspec data regenerate regen.engine=openai` against a plain vLLM server (`run_regeneration` +
     `OpenAIEngine`), then, on a feature server (deepspec's connector),
(Ea) `deepspec data features features.source=vllm` on R0's answers, cold (the two stages run apart);
(R)  the same regeneration against the feature server, and
(Eb) the extraction of R's answers right after it, on R's prefix cache;
(C)  `deepspec data features features.source=vllm features.regenerate=true` (`run_one_pass`), after R and
     Eb, or before them with --one-pass-first (the machine's load drifts: compare both orders).

Each phase sends its own `cache_salt`, so none reuses another's prefix cache except Eb (R's salt).
Prints per phase the target tokens computed (prompt tokens the prefix cache did not serve + generated
tokens but the last), the extra positions a feature server verifies while generating (vLLM's
`extract_hidden_states` proposes the sampled token again as a one-token draft: drafted - accepted, from
its /metrics), per token of the training sequences written, wall seconds and CPU seconds (this process
and the server's); then (a) = R0 + Ea, (b) = R + Eb, (c) = C; then C's answers against R0's and R's, its
token ids and features against Eb's cache, and its features against transformers' on the same ids.
Ends with `passes_a=... passes_b=... passes_c=... cpu_s_a=... cpu_s_b=... cpu_s_c=...`.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
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

    def _payload(self, messages, token_ids):
        return json.dumps({**json.loads(super()._payload(messages, token_ids)), "cache_salt": self.salt}).encode()

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


def spec_tokens(url: str) -> tuple[float, float]:
    """(drafted, accepted) speculative tokens the server counted so far (its Prometheus /metrics)."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    def total(name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))
    return total("vllm:spec_decode_num_draft_tokens_total"), total("vllm:spec_decode_num_accepted_tokens_total")


def one_pass_benchmark(a, layers: list[int]) -> None:
    torch.set_num_threads(a.threads or 1)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # one core for vLLM, as for torch here
    os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    work = Path(a.workdir).resolve() / f"one_pass_{uuid.uuid4().hex[:8]}"
    target_dir, _ = ec.ensure_target_dir(Path(a.workdir).resolve())
    target = load_target(str(target_dir), name="smollm2-135m-instruct", device="cpu", dtype=a.dtype)
    inp = write_prompts(work / "prompts.jsonl", a.sequences)
    settings = SamplingSettings(max_new_tokens=a.max_new_tokens, max_seq_len=2048)
    conc = a.concurrency
    print(f"{a.sequences} GSM8K prompts, greedy answers of up to {a.max_new_tokens} tokens, {a.dtype}, vLLM block "
          f"size {BLOCK_SIZE}, {conc} requests in flight, taps {layers} + final; work in {work}")
    phases: dict[str, tuple[int, float, float, float]] = {}  # target tokens, drafted positions, wall s, CPU s
    server = {"dtype": a.dtype, "max_model_len": 2049, "extra": ["--block-size", str(BLOCK_SIZE)]}

    def regenerate(url: str, folder: str, salt: str):
        engine = SaltedEngine([url], VllmExtractor._served_model(url), settings, concurrency=conc, salt=salt)
        _, wall, cpu = measured(lambda: run_regeneration(inp, work / folder, engine, settings, progress=False))
        return engine.computed, wall, cpu

    def extract(url: str, regen: str, folder: str, salt: str):
        ex = VllmExtractor([url], target, layers, concurrency=conc, cache_salt=salt)
        _, wall, cpu = measured(lambda: write_feature_cache(work / regen, target, layers, work / folder,
                                                            storage_dtype="bf16", max_seq_len=2048,
                                                            progress=False, extractor=ex, engine="vllm"))
        return ex.stats["prompt_tokens"] - ex.stats["cached_tokens"], 0, wall, cpu

    with local_server(target_dir, [], work / "plain", log=work / "plain_server.log", **server) as url:
        computed, wall, cpu = regenerate(url, "r0", uuid.uuid4().hex)
        phases["R0 regenerate, plain vLLM server"] = (computed, 0, wall, cpu)
    t0 = time.perf_counter()
    with local_server(target_dir, vllm_layer_ids(layers, target.num_layers), work / "hs",
                      log=work / "vllm_server.log", **server) as url:
        print(f"vLLM feature server ready in {time.perf_counter() - t0:.0f} s")
        VllmExtractor([url], target, layers, cache_salt="warm-up")([ChatSequence("w", "train", list(range(100, 164)),
                                                                                [True] * 64)])
        phases["Ea extract R0's answers, cold"] = extract(url, "r0", "fa", uuid.uuid4().hex)

        def two_stages_on_one_server():
            salt_r = uuid.uuid4().hex
            d0 = spec_tokens(url)
            computed, wall, cpu = regenerate(url, "r", salt_r)
            d1 = spec_tokens(url)
            phases["R regenerate, feature server"] = (computed, d1[0] - d1[1] - d0[0] + d0[1], wall, cpu)
            phases["Eb extract R's answers right after"] = extract(url, "r", "fb", salt_r)

        def one_pass():
            runner = OnePass(VllmExtractor([url], target, layers, concurrency=conc, cache_salt=uuid.uuid4().hex),
                             target.tokenizer, settings, "bf16")
            d0 = spec_tokens(url)
            summary, wall, cpu = measured(lambda: run_one_pass(inp, work / "c", runner, target, layers,
                                                               concurrency=conc, progress=False))
            d1 = spec_tokens(url)
            p = summary["passes"]
            phases["C one pass: generate"] = (p["generate_tokens"], d1[0] - d1[1] - d0[0] + d0[1], None, None)
            phases["C one pass: follow-up"] = (p["follow_up_tokens"], 0, None, None)
            phases["C one pass"] = (p["generate_tokens"] + p["follow_up_tokens"], phases["C one pass: generate"][1],
                                    wall, cpu)

        for run in ((one_pass, two_stages_on_one_server) if a.one_pass_first else (two_stages_on_one_server,
                                                                                    one_pass)):
            run()
    tokens = {k: FeatureCache(work / k).manifest["tokens"] for k in ("fa", "fb", "c")}
    of = {"R0": "fa", "Ea": "fa", "R ": "fb", "Eb": "fb", "C ": "c"}
    rows = []
    for name, (computed, drafted, wall, cpu) in phases.items():
        n = tokens[of[name[:2]]]
        rows.append({"phase": name, "target_tokens": computed, "drafted_extra": drafted, "sequence_tokens": n,
                     "passes_per_token": round(computed / n, 3), "incl_drafted": round((computed + drafted) / n, 3),
                     "wall_s": _r(wall), "cpu_s": _r(cpu)})
    print(format_table(rows))
    modes = {"a": ("(a) regenerate (plain server), then extract cold", ("R0 regenerate, plain vLLM server",
                                                                         "Ea extract R0's answers, cold"), "fa"),
             "b": ("(b) regenerate, then extract on its prefix cache", ("R regenerate, feature server",
                                                                         "Eb extract R's answers right after"), "fb"),
             "c": ("(c) one pass (features.regenerate=true)", ("C one pass",), "c")}
    totals = {}
    for k, (name, keys, cache) in modes.items():
        computed, drafted, wall, cpu = (sum(phases[x][i] for x in keys) for i in range(4))
        totals[k] = {"mode": name, "target_tokens": computed, "drafted_extra": drafted,
                     "passes_per_token": round(computed / tokens[cache], 3),
                     "incl_drafted": round((computed + drafted) / tokens[cache], 3),
                     "wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}
    print(format_table(list(totals.values())))
    one, two = FeatureCache(work / "c"), FeatureCache(work / "fb")
    for other in ("r0", "r"):
        answers = [r["messages"] for _, r in iter_jsonl(work / other / "regenerated.jsonl")]
        mine = [r["messages"] for _, r in iter_jsonl(work / "c" / "regenerated.jsonl")]
        print(f"one pass vs {other}: {sum(x == y for x, y in zip(answers, mine, strict=True))}/{len(mine)} "
              f"identical answers")
    ids = one.sequence_ids()
    same = [(i, j) for i, j in zip(ids, two.sequence_ids(), strict=True)
            if torch.equal(one[i].input_ids_T, two[j].input_ids_T)]
    err = rel_errors([one[i] for i, _ in same], [two[j] for _, j in same]) if same else {}
    feats = [one[i] for i in ids]
    ref = extract_features(target, layers, [ChatSequence(str(i), "train", f.input_ids_T.tolist(),
                                                         f.loss_mask_T.tolist()) for i, f in zip(ids, feats,
                                                                                                 strict=True)])
    vs_hf = rel_errors(feats, ref)
    print(f"one pass vs R + Eb: {len(same)}/{len(ids)} identical token sequences, features on those max relative "
          f"error {max(err.values(), default=float('nan')):.4f}; one-pass features vs transformers ({a.dtype}) on "
          f"the same ids: max relative error {max(vs_hf.values()):.4f} "
          f"({', '.join(f'{k} {v:.4f}' for k, v in vs_hf.items())})")
    print(" ".join(f"passes_{k}={v['passes_per_token']}" for k, v in totals.items()) + " " +
          " ".join(f"cpu_s_{k}={v['cpu_s']}" for k, v in totals.items()))


def _r(x: float | None):
    return "-" if x is None else round(x, 1)
