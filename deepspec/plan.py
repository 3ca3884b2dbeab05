"""`deepspec plan`: capacity plan of a recipe's drafter before renting the GPUs (docs/training.md).

    deepspec plan recipe=dspark_v4_flash [plan.nodes=4 plan.gpus_per_node=8 plan.tokens=1240000000]

Nothing is loaded: the target's geometry comes from its config (random:TYPE, a local directory's
config.json, or the known DeepSeek-V4 presets), the drafter is built on the meta device and its
parameters counted. Printed and returned (summary.json):

- drafter_params (trainable; the target's embedding / LM head are borrowed, never trained),
- bytes_per_gpu per ZeRO stage 0-3 = model states + frozen shared weights + activations (+ the
  target shard when features are computed online). Model states use the usual mixed-precision
  accounting: bf16 weights 2 B + bf16 grads 2 B + fp32 master, Adam m and v 12 B per parameter;
  ZeRO-1 shards the 12 B, ZeRO-2 also the grads, ZeRO-3 everything, over nodes x gpus_per_node.
  Activations are an estimate for one micro-batch (formula in `activation_bytes`).
- cache_bytes_per_token per storage dtype, as `deepspec data features` stores them (int32 id + mask
  byte + the m taps and the final hidden; fp8 adds a 4-byte scale per tap row and keeps the final
  hidden in bf16), and the terabytes for `plan.tokens` tokens.
- an expected cost: GPU-hours for `trainer.epochs` over `plan.tokens`, per micro-step the larger
  of compute (at `plan.mfu` of an H100's bf16 peak) and ZeRO traffic (stage 3: all-gather the bf16
  weights for forward and backward + reduce-scatter the grads = 6 B/param; stages 0-2: all-reduce
  of the bf16 grads = 4 B/param) over `plan.interconnect_gbps` per GPU.
- the feature stage (`feature_stage`): target prefill over `plan.tokens` on one extraction server per
  node (features.source=vllm: launch/vllm_features.sbatch), at `features.vllm_tokens_per_s` per server
  when stated (measured), else estimated as the node's bf16 peak x `plan.mfu` / (2 x the target's
  active parameters per token: routed experts counted at top-k / n_routed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from deepspec.config import section
from deepspec.drafters import build_drafter, resolve_spec
from deepspec.drafters.spec import DrafterSpec
from deepspec.runs import format_table
from deepspec.targets.loading import target_config
from deepspec.targets.shapes import TargetShapes, shapes_from_hf_config

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp8": 1}
H100_BF16_FLOPS = 989e12  # dense bf16 peak
GIB = 2 ** 30


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def target_params(config) -> int:
    """Parameter count of the full target, built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return count_params(AutoModelForCausalLM.from_config(config))


def target_active_params(config) -> tuple[int, int]:
    """(total, active per token) parameters of the target, built on the meta device; routed experts
    (parameters under an `experts` module) count at num_experts_per_tok / n_routed_experts."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = count_params(model)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    routed, top_k = getattr(config, "n_routed_experts", None), getattr(config, "num_experts_per_tok", None)
    share = top_k / routed if routed and top_k else 1.0
    return total, int(total - experts * (1 - share))


def feature_stage(total_params: int, active_params: int, tokens: int, nodes: int, gpus_per_node: int,
                  mfu: float, source: str, tokens_per_s: float | None) -> dict[str, Any]:
    """Hours of the feature stage: one target prefill per token, one extraction server per node."""
    estimated = tokens_per_s is None
    per_server = tokens_per_s or gpus_per_node * H100_BF16_FLOPS * mfu / (2 * active_params)
    hours = tokens / (per_server * nodes) / 3600
    return {"source": source, "servers": nodes, "tokens_per_s_per_server": per_server,
            "throughput": "estimated" if estimated else "stated (features.vllm_tokens_per_s)",
            "target_params": total_params, "target_active_params": active_params,
            "wall_hours": hours, "gpu_hours": hours * nodes * gpus_per_node}


def cache_bytes_per_token(hidden: int, num_taps: int, dtype: str) -> int:
    """Feature-cache bytes per token, as `deepspec data features` writes them (data_tools/cache.py)."""
    from deepspec.features import bytes_per_token

    return bytes_per_token(num_taps, hidden, dtype)


def model_state_bytes(params: int, stage: int, world: int) -> int:
    """bf16 weights + bf16 grads + fp32 master/m/v (2 + 2 + 12 B per parameter) under ZeRO `stage`."""
    w, g, opt = 2 * params, 2 * params, 12 * params
    return {0: w + g + opt, 1: w + g + opt // world, 2: w + (g + opt) // world, 3: (w + g + opt) // world}[stage]


def activation_bytes(spec: DrafterSpec, v4: Any, hidden: int, vocab: int, micro_batch: int, seq_len: int,
                     vocab_chunk: int) -> int:
    """Estimated bf16 activations of one micro-batch (no activation checkpointing).

    Q = micro_batch x anchors x γ block queries, C = micro_batch x seq_len context tokens. Per layer:
    the mHC streams around both mixes, the attention projections and output, the MoE's routed
    copies (top-k x [D, 2I, I, D]) and shared expert, the context K=V; plus the fused context, and
    two fp32 [Q, vocab_chunk] logit chunks of the chunked loss.
    """
    Q = micro_batch * min(spec.anchors_per_seq, seq_len) * spec.block_size
    C = micro_batch * seq_len
    m = len(spec.layer_ids)
    if v4 is not None:
        H, hd, hc = v4.num_attention_heads, v4.head_dim, v4.hc_mult
        k, inter, E = v4.num_experts_per_tok, v4.moe_intermediate_size, v4.n_routed_experts
        attn = hidden + v4.q_lora_rank + 3 * H * hd + hd + v4.o_groups * v4.o_lora_rank
        moe = hidden + E + k * (2 * hidden + 3 * inter) + 3 * inter
        per_layer = Q * (4 * hc * hidden + attn + moe) + C * hd
    else:
        H, hd, inter = spec.num_heads, spec.head_dim, spec.intermediate_size
        per_layer = Q * (4 * hidden + 3 * H * hd + 3 * inter) + 2 * C * spec.num_kv_heads * hd
    elements = spec.num_layers * per_layer + C * (m + 1) * hidden
    return 2 * elements + 2 * 4 * Q * min(vocab_chunk, vocab)


def flops_per_query_token(drafter: torch.nn.Module, spec: DrafterSpec, hidden: int, vocab: int) -> float:
    """Training FLOPs per block query: 6 x active params + the frozen LM head (forward + input grad)
    + the Markov W2 (6 r V) + attention over the window and the block."""
    v4 = getattr(drafter, "v4_config", None)
    params = count_params(drafter)
    active = params - (count_params(drafter.head) if getattr(drafter, "head", None) is not None else 0)
    window = spec.sliding_window or 2048
    if v4 is not None:
        per_expert = 3 * hidden * v4.moe_intermediate_size
        idle = (v4.n_routed_experts - v4.num_experts_per_tok) * per_expert * spec.num_layers
        active -= idle
        attn = 4 * v4.num_attention_heads * v4.head_dim * (window + spec.block_size) * spec.num_layers
    else:
        attn = 4 * spec.num_heads * spec.head_dim * (window + spec.block_size) * spec.num_layers
    markov = 6 * spec.markov_rank * vocab if spec.head != "none" else 0
    return 6 * active + 4 * vocab * hidden + markov + 3 * attn


def capacity_plan(spec: DrafterSpec, target_cfg, *, nodes: int, gpus_per_node: int, gpu_memory_gib: float,
                  tokens: int, micro_batch: int, seq_len: int, vocab_chunk: int, features: str,
                  target_dtype: str, epochs: float, zero_stage: int = 3, mfu: float = 0.35,
                  interconnect_gbps: float = 400.0, extract_tokens_per_s: float | None = None) -> dict[str, Any]:
    """The plan for one drafter/target (see the module docstring); all sizes in bytes."""
    shapes: TargetShapes = shapes_from_hf_config(target_cfg)
    spec = resolve_spec(spec, shapes)
    with torch.device("meta"):
        drafter = build_drafter(spec, shapes)
    params = count_params(drafter)
    world = nodes * gpus_per_node
    D, V = shapes.hidden_size, shapes.vocab_size
    tied = bool(getattr(target_cfg, "tie_word_embeddings", False))
    shared = 2 * V * D * (1 if tied else 2)  # frozen embedding + LM head, bf16, on every GPU
    acts = activation_bytes(spec, getattr(drafter, "v4_config", None), D, V, micro_batch, seq_len, vocab_chunk)
    t_params, t_active = target_active_params(target_cfg)
    target_shard = {d: t_params * DTYPE_BYTES[d] // gpus_per_node for d in ("bf16", "fp8")}
    online = features in ("online", "hybrid")
    resident = target_shard["fp8" if target_dtype == "fp8" else "bf16"] if online else 0
    per_stage = {}
    for stage in range(4):
        states = model_state_bytes(params, stage, world)
        total = states + shared + acts + resident
        per_stage[f"zero{stage}"] = {"model_states": states, "total": total,
                                     "fits": total <= gpu_memory_gib * GIB}
    cache = {d: cache_bytes_per_token(D, len(spec.layer_ids), d) for d in ("fp32", "bf16", "fp16", "fp8")}
    sequences = tokens / seq_len * epochs
    micro_steps = sequences / (world * micro_batch)  # per GPU
    q_per_micro = micro_batch * min(spec.anchors_per_seq, seq_len) * spec.block_size
    compute_s = q_per_micro * flops_per_query_token(drafter, spec, D, V) / (H100_BF16_FLOPS * mfu)
    comm_s = (6 if zero_stage == 3 else 4) * params / (interconnect_gbps / 8 * 1e9) if world > 1 else 0.0
    wall_h = micro_steps * max(compute_s, comm_s) / 3600
    return {
        "target": {"model_type": shapes.model_type, "layers": shapes.num_layers, "hidden": D, "vocab": V,
                   "params": t_params},
        "drafter": {"kind": spec.kind, "backbone": spec.backbone, "layers": spec.num_layers,
                    "layer_ids": list(spec.layer_ids), "block_size": spec.block_size},
        "drafter_params": params,
        "drafter_params_by_module": {name: count_params(m) for name, m in drafter.named_children()},
        "world": {"nodes": nodes, "gpus_per_node": gpus_per_node, "gpus": world, "gpu_memory_gib": gpu_memory_gib},
        "bytes_per_gpu": {k: v["total"] for k, v in per_stage.items()},
        "per_stage": per_stage,
        "frozen_shared_bytes": shared, "activation_bytes": acts, "micro_batch": micro_batch,
        "features": features, "online_target_shard_bytes": target_shard,
        "cache_bytes_per_token": cache, "tokens": tokens,
        "cache_tb": {d: b * tokens / 1e12 for d, b in cache.items()},
        "cost": {"epochs": epochs, "zero_stage": zero_stage, "mfu": mfu, "interconnect_gbps": interconnect_gbps,
                 "micro_steps_per_gpu": micro_steps, "compute_s_per_micro_step": compute_s,
                 "comm_s_per_micro_step": comm_s, "wall_hours": wall_h, "gpu_hours": wall_h * world},
        "feature_stage": feature_stage(t_params, t_active, tokens, nodes, gpus_per_node, mfu, features,
                                       extract_tokens_per_s),
    }


def plan_from_config(cfg: DictConfig) -> dict[str, Any]:
    t, p = cfg.target, cfg.plan
    random_config = OmegaConf.to_container(t.random_config) if t.random_config else None
    target_cfg = target_config(t.source, t.name, t.gguf_file, random_config)
    return capacity_plan(section(cfg, "drafter"), target_cfg, nodes=p.nodes, gpus_per_node=p.gpus_per_node,
                         gpu_memory_gib=p.gpu_memory_gib, tokens=p.tokens, micro_batch=cfg.trainer.micro_batch,
                         seq_len=cfg.data.max_seq_len, vocab_chunk=cfg.loss.vocab_chunk,
                         features=cfg.features.source, target_dtype=cfg.features.dtype, epochs=cfg.trainer.epochs,
                         zero_stage=cfg.deepspeed.zero_stage, mfu=p.mfu,
                         interconnect_gbps=p.interconnect_gbps,
                         extract_tokens_per_s=cfg.features.vllm_tokens_per_s)


def report(plan: dict[str, Any], title: str = "") -> str:
    """The plan as tables a person reads."""
    gib = lambda b: f"{b / GIB:,.1f} GiB"  # noqa: E731
    w = plan["world"]
    lines = [f"{title} drafter {plan['drafter']['kind']}/{plan['drafter']['backbone']} "
             f"({plan['drafter']['layers']} layers, taps {plan['drafter']['layer_ids']}): "
             f"{plan['drafter_params'] / 1e9:.3f} B trainable params; target {plan['target']['params'] / 1e9:.1f} B "
             f"params; {w['nodes']} node(s) x {w['gpus_per_node']} GPUs ({w['gpu_memory_gib']:.0f} GiB)"]
    rows = [{"zero": k, "model states": gib(v["model_states"]), "+ frozen emb/head": gib(plan["frozen_shared_bytes"]),
             "+ activations": gib(plan["activation_bytes"]),
             "+ target shard": gib(v["total"] - v["model_states"] - plan["frozen_shared_bytes"]
                                   - plan["activation_bytes"]),
             "total / GPU": gib(v["total"]), "fits": "yes" if v["fits"] else "NO"}
            for k, v in plan["per_stage"].items()]
    lines.append(format_table(rows))
    lines.append(format_table([{"cache dtype": d, "bytes/token": f"{b:,}", f"TB for {plan['tokens']:,} tokens":
                                f"{plan['cache_tb'][d]:,.1f}"} for d, b in plan["cache_bytes_per_token"].items()]))
    c = plan["cost"]
    bound = "communication" if c["comm_s_per_micro_step"] > c["compute_s_per_micro_step"] else "compute"
    lines.append(f"expected cost (ZeRO-{c['zero_stage']}, micro-batch {plan['micro_batch']}): {c['gpu_hours']:,.0f} "
                 f"GPU-hours for {c['epochs']} epoch(s), ~{c['wall_hours']:,.1f} h wall on {w['gpus']} GPUs "
                 f"({bound}-bound: {c['compute_s_per_micro_step']:.2f} s compute at {c['mfu']:.0%} MFU vs "
                 f"{c['comm_s_per_micro_step']:.2f} s ZeRO traffic at {c['interconnect_gbps']:.0f} Gb/s per "
                 f"micro-step)\nonline target shard per GPU: "
                 f"bf16 {gib(plan['online_target_shard_bytes']['bf16'])}, fp8 {gib(plan['online_target_shard_bytes']['fp8'])}")
    f = plan["feature_stage"]
    lines.append(f"feature stage (one vLLM extraction server per node, launch/vllm_features.sbatch): "
                 f"{f['servers']} server(s) x {f['tokens_per_s_per_server']:,.0f} "
                 f"tok/s ({f['throughput']}; target {f['target_active_params'] / 1e9:.1f} B active of "
                 f"{f['target_params'] / 1e9:.1f} B params) = ~{f['wall_hours']:,.1f} h wall, "
                 f"{f['gpu_hours']:,.0f} GPU-hours for {plan['tokens']:,} tokens (one target pass per token)")
    return "\n".join(lines)


def run(cfg: DictConfig) -> dict:
    """`deepspec plan recipe=...`: print the plan and return it (written to output_dir/summary.json)."""
    plan = plan_from_config(cfg)
    print(report(plan, cfg.recipe))
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    return plan
