"""Training throughput of the drafters: anchor-tokens/s and sequences/s per optimizer step.

CPU (default): the three SmolLM2 recipes (DSpark, DFlash, Eagle3) on the embedded
SmolLM2-135M target, side by side, through the real DeepSpeed engine and training step,
each in fp32 and with bf16 autocast (fp32 master weights, `trainer.precision=amp`).
Target features are computed once before timing (random-token sequences, loss mask on the
last 3/4) and the target forward is timed separately: its tokens/s is what online features
add per training token.

    python benchmarks/train_throughput.py [--steps 3] [--seq-len 256] [--micro-batch 4] [--recipes ...]

Rates are given per wall-clock second and per CPU second of the process (one thread: on a
machine shared with other jobs, only the latter compares runs made at different moments).

GPU (--device cuda): a Qwen3-4B-shaped DSpark (36-layer target geometry, d=2560, V=151936,
5 draft layers, γ=7, Markov r=256, 512 anchors per sequence) with random weights (built on
the meta device, then materialised on the GPU), random features, bf16, ZeRO-2 on one GPU:
tokens/s and peak GPU memory. No target weights are needed.

    python benchmarks/train_throughput.py --device cuda [--seq-len 4096] [--micro-batch 8]

"anchor tokens" = block slots trained (blocks x γ; Eagle3: positions x TTT steps).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deepspec.config import DeepSpeedConfig, TrainerConfig  # noqa: E402
from deepspec.drafters import build_drafter, resolve_spec  # noqa: E402
from deepspec.drafters.packing import SequenceFeatures  # noqa: E402
from deepspec.drafters.spec import DrafterSpec  # noqa: E402
from deepspec.targets.shapes import TargetShapes  # noqa: E402
from deepspec.training.distributed import build_engine, deepspeed_json, init_distributed  # noqa: E402
from deepspec.training.loop import DraftLoss, loss_weights, make_batch, train_step  # noqa: E402

QWEN3_4B = TargetShapes(model_type="qwen3", num_layers=36, hidden_size=2560, vocab_size=151936, num_heads=32,
                        num_kv_heads=8, head_dim=128, intermediate_size=9728, rms_norm_eps=1e-6,
                        rope_theta=1_000_000.0, qk_norm=True, max_position_embeddings=40960)


def random_sequences(n: int, seq_len: int, num_taps: int, dim: int, vocab: int, device, dtype,
                     seed: int = 0) -> list[SequenceFeatures]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (seq_len,), generator=g)
        mask = torch.zeros(seq_len, dtype=torch.bool)
        mask[seq_len // 4:] = True
        taps = torch.randn(seq_len, num_taps, dim, generator=g)
        final = torch.randn(seq_len, dim, generator=g)
        out.append(SequenceFeatures(ids.to(device), mask.to(device), taps.to(device, dtype), final.to(device, dtype)))
    return out


def time_steps(drafter, spec, lm_head, seqs_per_step: list[list[SequenceFeatures]], device, dtype, bf16: bool,
               zero_stage: int, vocab_chunk: int, warmup: int, alphas=(0.1, 0.9, 1.0),
               keep_probs_mb: float = 0.0, autocast_dtype=None) -> dict:
    """Run warmup + timed optimizer steps (one micro-batch each) through the DeepSpeed engine."""
    weights_K = loss_weights(spec, None)
    model = DraftLoss(drafter, lm_head, weights_K, *alphas, vocab_chunk, keep_probs_mb).to(device)
    micro = len(seqs_per_step[0])
    tr = TrainerConfig(micro_batch=micro, lr=1e-4)
    ds = deepspeed_json(DeepSpeedConfig(zero_stage=zero_stage), tr, grad_accum=1, world_size=1, bf16=bf16)
    engine = build_engine(model, ds, lambda s: 1.0)
    times, cpu_times, tokens = [], [], []
    for i, seqs in enumerate(seqs_per_step):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        batch = make_batch(seqs, spec, seed=i, device=device, dtype=dtype)
        m = train_step(engine, [batch], weights_K, 1, autocast_dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
            tokens.append(m["anchor_tokens"])
    s = sum(times)
    return {"s_per_step": s / len(times), "anchor_tokens_per_s": sum(tokens) / s,
            "anchor_tokens_per_cpu_s": sum(tokens) / sum(cpu_times),
            "sequences_per_s": micro * len(times) / s, "loss": m["loss"]}


def cpu_benchmark(args) -> None:
    from deepspec.config import compose, section
    from deepspec.runs import format_table
    from deepspec.targets import target_from_config

    rows = []
    # each recipe as configured, and DSpark with the loss recomputing logits (loss.keep_probs_mb=0) as the
    # baseline of the kept-probabilities setting the CPU recipes use
    runs = [(recipe, [], amp) for recipe in args.recipes for amp in (None, torch.bfloat16)]
    if "dspark_smollm2" in args.recipes:
        runs.append(("dspark_smollm2", ["loss.keep_probs_mb=0"], None))
    for recipe, extra, amp in runs:
        cfg = compose([f"recipe={recipe}", "target.device=cpu", *extra])
        target = target_from_config(cfg, need_tokenizer=False)
        spec = resolve_spec(section(cfg, "drafter"), target.shapes)
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        n = args.micro_batch * (args.steps + 1)
        ids = torch.randint(0, target.vocab_size, (n, args.seq_len), generator=g)
        t0 = time.perf_counter()
        feats = target.forward(ids, spec.layer_ids)
        target_tps = ids.numel() / (time.perf_counter() - t0)
        mask = torch.zeros(args.seq_len, dtype=torch.bool)
        mask[args.seq_len // 4:] = True
        seqs = [SequenceFeatures(ids[i], mask, feats.taps_BTMD[i], feats.final_BTD[i]) for i in range(n)]
        steps = [seqs[i:i + args.micro_batch] for i in range(0, n, args.micro_batch)]
        drafter = build_drafter(spec, target.shapes)
        drafter.attach_target(target.embed_tokens, target.lm_head_weight)
        r = time_steps(drafter, spec, target.lm_head_weight, steps, torch.device("cpu"), torch.float32, False, 0,
                       cfg.loss.vocab_chunk, warmup=1, alphas=(cfg.loss.alpha_ce, cfg.loss.alpha_tv,
                                                               cfg.loss.alpha_conf),
                       keep_probs_mb=cfg.loss.keep_probs_mb, autocast_dtype=amp)
        params = sum(p.numel() for p in drafter.parameters() if p.requires_grad)
        rows.append({"recipe": recipe + (" (recompute)" if extra else ""),
                     "precision": "bf16 amp" if amp else "fp32",
                     "trainable_M": round(params / 1e6, 2), "s/step": round(r["s_per_step"], 2),
                     "anchor_tok/s": round(r["anchor_tokens_per_s"]),
                     "anchor_tok/cpu_s": round(r["anchor_tokens_per_cpu_s"]),
                     "seq/s": round(r["sequences_per_s"], 2),
                     "target_fwd_tok/s": round(target_tps)})
        print(rows[-1], flush=True)
    print(f"\nCPU ({os.cpu_count()} cores, torch threads {torch.get_num_threads()}), micro-batch {args.micro_batch} x "
          f"{args.seq_len} tokens, {args.steps} timed steps after 1 warm-up; features precomputed "
          f"(target_fwd_tok/s = online-feature cost)")
    print(format_table(rows))
    print("bf16 autocast / fp32 anchor tokens per CPU second (wall clock): " + ", ".join(
        f"{rows[i]['recipe']} {rows[i + 1]['anchor_tok/cpu_s'] / rows[i]['anchor_tok/cpu_s']:.2f}x "
        f"({rows[i + 1]['anchor_tok/s'] / rows[i]['anchor_tok/s']:.2f}x)"
        for i in range(0, 2 * len(args.recipes), 2)))
    if "dspark_smollm2" in args.recipes:
        i = 2 * args.recipes.index("dspark_smollm2")
        kept = rows[i]["anchor_tok/cpu_s"] / rows[-1]["anchor_tok/cpu_s"]
        print(f"DSpark kept probabilities vs recompute (fp32): {kept:.2f}x anchor tokens per CPU second")


def gpu_benchmark(args) -> None:
    env = init_distributed("cuda")
    dev = env.device
    spec = DrafterSpec(kind="dspark", num_layers=5, block_size=7, mask_token_id=151669, head="markov",
                       markov_rank=256, anchors_per_seq=512)
    spec = resolve_spec(spec, QWEN3_4B)
    with torch.device("meta"):
        drafter = build_drafter(spec, QWEN3_4B)
    drafter = drafter.to_empty(device=dev)
    with torch.no_grad():  # materialise: norms 1, Markov W2 0 (as built), other weights N(0, 0.02)
        for name, p in drafter.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("w2"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
    g = torch.Generator(device=dev).manual_seed(0)
    embed = torch.randn(QWEN3_4B.vocab_size, QWEN3_4B.hidden_size, device=dev, dtype=torch.bfloat16, generator=g)
    lm_head = torch.randn(QWEN3_4B.vocab_size, QWEN3_4B.hidden_size, device=dev, dtype=torch.bfloat16,
                          generator=g) * 0.02
    drafter.attach_target(embed, lm_head)
    n = args.micro_batch * (args.steps + 2)
    seqs = random_sequences(n, args.seq_len, len(spec.layer_ids), QWEN3_4B.hidden_size, QWEN3_4B.vocab_size, dev,
                            torch.bfloat16)
    steps = [seqs[i:i + args.micro_batch] for i in range(0, n, args.micro_batch)]
    torch.cuda.reset_peak_memory_stats()
    r = time_steps(drafter, spec, lm_head, steps, dev, torch.bfloat16, True, 2, 16384, warmup=2)
    peak = torch.cuda.max_memory_allocated() / 2**30
    params = sum(p.numel() for p in drafter.parameters())
    print(f"{torch.cuda.get_device_name()}: Qwen3-4B-shaped DSpark ({params / 1e6:.0f}M trainable, 5 layers, γ=7, "
          f"Markov r=256), bf16, ZeRO-2, micro-batch {args.micro_batch} x {args.seq_len} tokens, 512 anchors/seq")
    print(f"  {r['s_per_step']:.3f} s/step, {r['anchor_tokens_per_s']:.0f} anchor-tokens/s, "
          f"{r['sequences_per_s']:.1f} sequences/s, peak GPU memory {peak:.1f} GiB (incl. 2x0.78 GB embed/LM head)")
    tokens_run = 1.24e9
    print(f"  at this rate one epoch of 1.24B target tokens ({tokens_run / args.seq_len:.0f} sequences) takes "
          f"{tokens_run / args.seq_len / r['sequences_per_s'] / 3600:.1f} GPU-hours on one GPU")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--recipes", nargs="+", default=["dspark_smollm2", "dflash_smollm2", "eagle3_smollm2"],
                    help="CPU: the recipes to measure, each in fp32 and with bf16 autocast")
    args = ap.parse_args()
    if args.device == "cpu":
        args.seq_len, args.micro_batch = args.seq_len or 256, args.micro_batch or 4
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        init_distributed("cpu")
        cpu_benchmark(args)
    else:
        args.seq_len, args.micro_batch = args.seq_len or 4096, args.micro_batch or 8
        gpu_benchmark(args)


if __name__ == "__main__":
    main()
