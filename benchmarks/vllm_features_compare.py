"""vLLM's hidden-state extraction beside `transformers` (run through `benchmarks/features.py --vllm`).

Same HF directory (SmolLM2 exported once), same dtype, same token ids (GSM8K question + reference
answer through the chat template). Prints:

1. feature tokens/s of `deepspec data features`' extraction (`extract_features`, one torch thread)
   and of vLLM's (`VllmExtractor` against a local server with deepspec's connector; vLLM pins its
   one worker to one core), alternating rounds, and their ratio;
2. the error between the two: relative Frobenius error per feature (each tap, the final state),
   beside bf16's own error (transformers bf16 vs transformers fp32; the tolerance is twice that),
   and how often p_t's argmax agrees;
3. target passes per answer token for `--answers` generated answers: regenerate then extract on a
   cold cache (what a separate feature stage costs), and regenerate-and-extract on one server (the
   extraction request right after the answer: vLLM's prefix cache serves the prompt and answer rows,
   only the template's tail is computed), with the one-pass features checked against transformers;
4. the line `max_rel_err=... vllm_tok_s=... hf_tok_s=...` (scripts/vllm_features_check.sh ends with it).
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
import uuid
from pathlib import Path

import torch

from data_tools.features import extract_features
from data_tools.tokenize import ChatSequence, tokenize_chat
from data_tools.vllm_features import VllmExtractor, final_state_source, local_server, vllm_layer_ids
from deepspec.export import engine_check as ec
from deepspec.runs import format_table
from deepspec.targets import load_target


def rel_errors(a_list, b_list) -> dict[str, float]:
    """Relative Frobenius error of a against b, per tap and for the final state, over all sequences."""
    taps_a = torch.cat([f.taps_TMD.float() for f in a_list])
    taps_b = torch.cat([f.taps_TMD.float() for f in b_list])
    out = {f"tap{m}": ((taps_a[:, m] - taps_b[:, m]).norm() / taps_b[:, m].norm()).item()
           for m in range(taps_b.shape[1])}
    fa = torch.cat([f.final_TD.float() for f in a_list])
    fb = torch.cat([f.final_TD.float() for f in b_list])
    out["final"] = ((fa - fb).norm() / fb.norm()).item()
    return out


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def generate(url: str, model: str, ids: list[int], max_tokens: int, salt: str) -> dict:
    body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0.0, "cache_salt": salt}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def passes_per_answer(url, target, layers, questions: list[str], max_tokens: int, final: str = "norm") -> dict:
    """Target passes per answer token, regenerate-then-extract vs regenerate-and-extract (see above)."""
    rows, one_pass_feats, hf_feats = [], [], []
    for q in questions:
        salt = uuid.uuid4().hex
        prompt = target.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                      tokenize=False)
        prompt_ids = target.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        gen = generate(url, VllmExtractor._served_model(url), prompt_ids, max_tokens, salt)
        usage = gen["usage"]
        gen_computed = usage["prompt_tokens"] + usage["completion_tokens"] - 1  # the last token is sampled only
        chat = tokenize_chat(target.tokenizer, [{"role": "user", "content": q},
                                                {"role": "assistant", "content": gen["choices"][0]["text"]}])
        seq = ChatSequence(q[:16], "train", chat.input_ids, chat.loss_mask)
        warm = VllmExtractor([url], target, layers, concurrency=1, cache_salt=salt, final_state=final)
        one_pass_feats += warm([seq])
        cold = VllmExtractor([url], target, layers, concurrency=1, cache_salt=uuid.uuid4().hex, final_state=final)
        cold([seq])
        hf_feats += extract_features(target, layers, [seq])
        n = len(seq.input_ids)
        extract_warm = warm.stats["prompt_tokens"] - warm.stats["cached_tokens"]
        extract_cold = cold.stats["prompt_tokens"] - cold.stats["cached_tokens"]
        rows.append({"tokens": n, "generated": usage["completion_tokens"], "regen_computed": gen_computed,
                     "extract_cold": extract_cold, "extract_after_regen": extract_warm,
                     "passes_two_stage": round((gen_computed + extract_cold) / n, 3),
                     "passes_one_pass": round((gen_computed + extract_warm) / n, 3)})
    tokens = sum(r["tokens"] for r in rows)
    return {"rows": rows,
            "two_stage": sum(r["regen_computed"] + r["extract_cold"] for r in rows) / tokens,
            "one_pass": sum(r["regen_computed"] + r["extract_after_regen"] for r in rows) / tokens,
            "one_pass_max_rel_err": max(rel_errors(one_pass_feats, hf_feats).values())}


def compare(a, sequences, layers: list[int]) -> None:
    torch.set_num_threads(a.threads or 1)
    # one core each: vLLM would otherwise bind its worker's OpenMP threads to every core of a 2-core machine
    # (with a KV connector it reserves none for itself here); unbound, it takes OMP_NUM_THREADS like torch here
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    work = Path(a.workdir).resolve()
    target_dir, _ = ec.ensure_target_dir(work)
    print(f"torch threads: {torch.get_num_threads()} (vLLM: OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, "
          f"VLLM_CPU_OMP_THREADS_BIND={os.environ['VLLM_CPU_OMP_THREADS_BIND']}); both engines load {target_dir} "
          f"in {a.dtype}")
    target = load_target(str(target_dir), name="smollm2-135m-instruct", device="cpu", dtype=a.dtype)
    ref = load_target(str(target_dir), name="smollm2-135m-instruct", device="cpu", dtype="float32")
    seqs = sequences(target.tokenizer, a.sequences)
    tokens = sum(len(s.input_ids) for s in seqs)
    hf_ref = extract_features(ref, layers, seqs, a.batch_tokens)
    del ref
    t0 = time.perf_counter()
    final = final_state_source(target, a.final_state)
    with local_server(target_dir, vllm_layer_ids(layers, target.num_layers, final), work / "hidden_states",
                      dtype=a.dtype, max_model_len=2048, log=work / "vllm_server.log", final=final,
                      extra=["--block-size", str(a.block_size)] if a.block_size else ()) as url:
        print(f"vLLM server ready in {time.perf_counter() - t0:.0f} s (log {work / 'vllm_server.log'}); final state: "
              f"{final} ({'the model gives it, deepspec plugin' if final == 'engine' else 'the target norm applied here'})")
        ex = VllmExtractor([url], target, layers, concurrency=8, cache_salt=None, final_state=final)
        ex(seqs[:1])
        extract_features(target, layers, seqs[:1], a.batch_tokens)  # warm-ups
        hf_s, vllm_s = [], []
        for r in range(a.rounds):
            hf, secs = timed(lambda: extract_features(target, layers, seqs, a.batch_tokens))
            hf_s.append(secs)
            ex.cache_salt = f"round{r}"  # a cold prefix cache every round: each round computes every token
            vl, secs = timed(lambda: ex(seqs))
            vllm_s.append(secs)
        passes = passes_per_answer(url, target, layers, _questions(a.answers), 128, final)
    hf_tok_s, vllm_tok_s = tokens / (sum(hf_s) / len(hf_s)), tokens / (sum(vllm_s) / len(vllm_s))
    print(format_table([{"engine": "transformers (deepspec data features)", "dtype": a.dtype, "tokens": tokens,
                         "seconds/round": " ".join(f"{s:.2f}" for s in hf_s), "tok/s": round(hf_tok_s, 1)},
                        {"engine": "vLLM extract_hidden_states", "dtype": a.dtype, "tokens": tokens,
                         "seconds/round": " ".join(f"{s:.2f}" for s in vllm_s), "tok/s": round(vllm_tok_s, 1)}]))
    print(f"vLLM / transformers feature tokens/s: {vllm_tok_s / hf_tok_s:.2f}x ({len(seqs)} sequences, "
          f"{tokens} tokens, taps {layers} + final)")
    err = rel_errors(vl, hf)
    own = rel_errors(hf, hf_ref)
    vs_ref = rel_errors(vl, hf_ref)
    print(format_table([{"feature": k, "vllm_vs_hf": f"{err[k]:.4f}", f"hf_{a.dtype}_vs_fp32": f"{own[k]:.4f}",
                         f"vllm_{a.dtype}_vs_fp32": f"{vs_ref[k]:.4f}"} for k in err]))
    lm = target.logits
    agree = torch.cat([(lm(v.final_TD).argmax(-1) == lm(h.final_TD).argmax(-1)) for v, h in zip(vl, hf, strict=True)])
    max_err, tol = max(err.values()), 2 * max(own.values())
    print(f"p_t argmax agreement vLLM vs transformers: {agree.float().mean().item():.4f} over {agree.numel()} "
          f"positions; max_rel_err {max_err:.4f} vs tolerance {tol:.4f} (2x {a.dtype}'s own error vs fp32): "
          f"{'within' if max_err <= tol else 'OUTSIDE'}")
    print(format_table(passes["rows"]))
    print(f"target passes per answer token: regenerate then extract {passes['two_stage']:.3f}, regenerate and "
          f"extract on one server {passes['one_pass']:.3f} (transformers: regenerate + extract, 2 by construction); "
          f"one-pass features vs transformers max_rel_err {passes['one_pass_max_rel_err']:.4f}")
    print(f"max_rel_err={max_err:.4f} vllm_tok_s={vllm_tok_s:.1f} hf_tok_s={hf_tok_s:.1f}")


def _questions(n: int) -> list[str]:
    from data_tools.sources import gsm8k_train_path

    out = []
    with open(gsm8k_train_path()) as f:
        for line in f:
            if len(out) == n:
                break
            out.append(json.loads(line)["question"])
    return out
