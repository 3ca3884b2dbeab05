"""Peak memory and time: vocabulary-chunked distillation loss vs the naive full-logits one.

Setting (docs/training.md): N = 512 anchors x 7 positions = 3584 rows, D = 576 (SmolLM2), the
DSpark loss (alpha 0.1 / 0.9 / 1.0) with a rank-256 Markov bias and a confidence logit,
forward + backward, at V = 49,152 (SmolLM2) and V = 129,280 (DeepSeek-V4).

  naive   = materialise draft and target logits [N, V], softmax, CE + TV + BCE, backward
  chunked = deepspec.losses.distill_losses (never more than a few [N, chunk] blocks)
  kept    = distill_losses with keep_probs_mb large enough to keep the draft/target
            probabilities for backward (no logit recompute; the CPU SmolLM2 recipes' setting)

Each (variant, vocab) runs in a fresh subprocess so the measurements do not see each other:
  - CUDA: torch.cuda.max_memory_allocated() minus the memory held by the inputs;
    time = median of --repeats timed runs after one warm-up, with synchronisation.
  - CPU: resource.getrusage(RUSAGE_SELF).ru_maxrss after the first forward+backward minus
    ru_maxrss once the inputs exist (the process high-water mark in resident memory,
    no psutil); time = median of the runs after that first one (the first alone if
    --repeats 1). The allocator may keep pages between runs; the delta is still an
    upper bound on what the loss itself needed at peak.

Run:  python benchmarks/chunked_loss.py --device cpu --rows 3584
      python benchmarks/chunked_loss.py --device cuda --dtype bfloat16
The last line printed is `peak_memory_ratio=<chunked/naive> time_ratio=<chunked/naive>
kept_time_ratio=<kept/chunked>` for V = 129,280 (or the largest vocab run).
SmolLM2 CPU training shape (one micro-batch of 4 sequences x 32 anchors):
      python benchmarks/chunked_loss.py --device cpu --rows 882 --vocab 49152 --threads 1
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

DSPARK_ALPHAS = dict(alpha_ce=0.1, alpha_tv=0.9, alpha_conf=1.0)


def make_inputs(rows: int, dim: int, vocab: int, rank: int, dtype: torch.dtype, device: str):
    g = torch.Generator(device=device).manual_seed(0)
    K = 7
    N = max(rows // K, 1)

    def rnd(*shape, scale=1.0, grad=False):
        t = torch.randn(*shape, generator=g, device=device, dtype=dtype)
        return t.mul_(scale).requires_grad_(grad)

    return dict(
        hidden_NKD=rnd(N, K, dim, grad=True),
        lm_weight_VD=rnd(vocab, dim, scale=dim ** -0.5),
        target_hidden_NKD=rnd(N, K, dim),
        labels_NK=torch.randint(0, vocab, (N, K), generator=g, device=device),
        valid_NK=torch.ones(N, K, dtype=torch.bool, device=device),
        weights_K=torch.exp(-torch.arange(K, dtype=torch.float32, device=device) / K),
        lowrank_NKR=rnd(N, K, rank, grad=True) if rank else None,
        lowrank_weight_RV=rnd(rank, vocab, scale=0.02, grad=True) if rank else None,
        conf_logit_NK=rnd(N, K, grad=True),
    )


def naive_loss(hidden_NKD, lm_weight_VD, target_hidden_NKD, labels_NK, valid_NK, weights_K,
               lowrank_NKR, lowrank_weight_RV, conf_logit_NK, alpha_ce, alpha_tv, alpha_conf):
    """What one writes without chunking: full [N, K, V] logits for draft and target."""
    z = hidden_NKD @ lm_weight_VD.T
    if lowrank_NKR is not None:
        z = z + lowrank_NKR @ lowrank_weight_RV
    logp = torch.log_softmax(z.float(), dim=-1)
    with torch.no_grad():
        p_t = torch.softmax((target_hidden_NKD @ lm_weight_VD.T).float(), dim=-1)
    w = weights_K * valid_NK
    ce = -logp.gather(-1, labels_NK[..., None])[..., 0]
    tv = (logp.exp() - p_t).abs().sum(-1)
    conf = F.binary_cross_entropy_with_logits(
        conf_logit_NK.float(), (1 - 0.5 * tv).detach().clamp(0, 1), weight=w, reduction="sum")
    return alpha_ce * (w * ce).sum() + alpha_tv * (w * tv).sum() + alpha_conf * conf


def worker(args) -> dict:
    """One variant at one vocab size, in this (fresh) process."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
    from deepspec.losses import distill_losses

    dtype = getattr(torch, args.dtype)
    cuda = args.device.startswith("cuda")
    if not cuda:
        torch.set_num_threads(args.threads or torch.get_num_threads())
    vocab = args.vocab[0]
    x = make_inputs(args.rows, args.dim, vocab, args.rank, dtype, args.device)
    params = [t for t in x.values() if isinstance(t, torch.Tensor) and t.requires_grad]

    def step():
        for p in params:
            p.grad = None
        if args.variant == "naive":
            loss = naive_loss(**x, **DSPARK_ALPHAS)
        else:
            keep = 1e9 if args.variant == "kept" else 0.0
            loss = distill_losses(**x, **DSPARK_ALPHAS, chunk_size=args.chunk, compile_chunks=args.compile,
                                  keep_probs_mb=keep).loss_sum
        loss.backward()
        return float(loss)

    def timed():
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        value = step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, value

    if args.compile and args.variant == "chunked":
        step()  # compile outside the measurement (both chunk widths get compiled)
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        first, value = timed()
        peak = torch.cuda.max_memory_allocated() - base
        times = [timed()[0] for _ in range(args.repeats)]
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        first, value = timed()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        times = [timed()[0] for _ in range(args.repeats - 1)] or [first]
    return dict(variant=args.variant, vocab=vocab, peak_bytes=peak,
                seconds=statistics.median(times), loss=value)


def run_variant(args, variant: str, vocab: int) -> dict:
    cmd = [sys.executable, __file__, "--_worker", variant, "--vocab", str(vocab),
           "--device", args.device, "--rows", str(args.rows), "--dim", str(args.dim),
           "--rank", str(args.rank), "--chunk", str(args.chunk), "--dtype", args.dtype,
           "--repeats", str(args.repeats), "--threads", str(args.threads)]
    if args.compile:
        cmd.append("--compile")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return dict(variant=variant, vocab=vocab, error=proc.stderr.strip().splitlines()[-1:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--vocab", type=int, nargs="+", default=[49152, 129280])
    ap.add_argument("--rows", type=int, default=3584, help="N*K rows (K = 7 positions)")
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--rank", type=int, default=256, help="Markov bias rank; 0 = none")
    ap.add_argument("--chunk", type=int, default=16384)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads; 0 = torch default")
    ap.add_argument("--compile", action="store_true",
                    help="chunked variant: torch.compile the per-chunk elementwise work")
    ap.add_argument("--_worker", choices=["naive", "chunked", "kept"], dest="variant")
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(worker(args)))
        return

    print(f"device={args.device} dtype={args.dtype} rows={args.rows} dim={args.dim} "
          f"rank={args.rank} chunk={args.chunk} compile={args.compile} "
          "(fresh subprocess per measurement)")
    print(f"{'vocab':>8} {'variant':>8} {'peak MiB':>10} {'time s':>9} {'loss':>12}")
    ratios = {}
    for vocab in args.vocab:
        res = {v: run_variant(args, v, vocab) for v in ("naive", "chunked", "kept")}
        for v, r in res.items():
            if "error" in r:
                print(f"{vocab:>8} {v:>8}  failed: {r['error']}")
            else:
                print(f"{vocab:>8} {v:>8} {r['peak_bytes'] / 2**20:>10.0f} "
                      f"{r['seconds']:>9.3f} {r['loss']:>12.4f}")
        if all("error" not in r for r in res.values()):
            ratios[vocab] = (res["chunked"]["peak_bytes"] / max(res["naive"]["peak_bytes"], 1),
                             res["chunked"]["seconds"] / res["naive"]["seconds"],
                             res["kept"]["seconds"] / res["chunked"]["seconds"])
            print(f"{vocab:>8}   ratio  chunked/naive: peak {ratios[vocab][0]:.3f}  time {ratios[vocab][1]:.3f}; "
                  f"kept/chunked time {ratios[vocab][2]:.3f}")
    main_vocab = 129280 if 129280 in ratios else (max(ratios) if ratios else None)
    if main_vocab is None:
        print("peak_memory_ratio=nan time_ratio=nan kept_time_ratio=nan")
    else:
        mem, t, kept = ratios[main_vocab]
        print(f"peak_memory_ratio={mem:.4f} time_ratio={t:.4f} kept_time_ratio={kept:.4f}")


if __name__ == "__main__":
    main()
