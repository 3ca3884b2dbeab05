"""Time the fused Triton verification kernel against the PyTorch reference.

    python benchmarks/verify_kernel.py --device cuda --batch 64 --gamma 7 --vocab 129280 49152
    python benchmarks/verify_kernel.py --device cpu   # interpreter: a correctness check only

For each vocabulary and mode (greedy / sampling) it prints, per backend, the time of one
call measured two ways (back-to-back calls incl. host overhead, and CUDA-graph replay =
GPU time only), the "effective GB/s" = bytes of the probability tensors the call is given
(target [B, K+1, V], plus draft [B, K, V] when sampling) / time, and the speedup of Triton
over the reference.  The kernel reads only the rows it needs, so its effective GB/s can
exceed the memory bandwidth: that is the point of fusing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--gamma", type=int, default=7)
    p.add_argument("--vocab", type=int, nargs="+", default=[129280, 49152])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--mode", default="both", choices=["greedy", "sampling", "both"])
    p.add_argument("--iters", type=int, default=100)
    return p.parse_args()


def _make_case(torch, B, K, V, greedy, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(B, K + 1, V, generator=g, device=device) * 4
    p_t = torch.softmax(logits, -1)
    p_d = torch.softmax(logits[:, :K] + torch.randn(B, K, V, generator=g, device=device), -1)
    drafts = torch.multinomial(p_d.reshape(-1, V), 1, generator=g).reshape(B, K)
    if greedy:
        drafts = torch.where(torch.rand(B, K, generator=g, device=device) < 0.85, p_t[:, :K].argmax(-1), drafts)
    return dict(
        draft_tokens_BK=drafts, draft_probs_BKV=None if greedy else p_d.to(dtype),
        target_probs_BK1V=p_t.to(dtype), num_drafts_B=torch.full((B,), K, device=device),
        uniforms_BK1=None if greedy else torch.rand(B, K + 1, generator=g, device=device),
        eos_id=None, greedy=greedy,
    )


def _time_calls(torch, fn, iters):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _time_graph(torch, fn, iters):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return _time_calls(torch, graph.replay, iters)


def main() -> None:
    args = _parse()
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # must precede the first `import triton`
    import torch

    from deepspec.kernels import verify

    dtype = getattr(torch, args.dtype)
    modes = ["greedy", "sampling"] if args.mode == "both" else [args.mode]
    if args.device == "cpu":
        print("CPU: Triton runs in the interpreter; this is a correctness check only, not a benchmark.")
        for V in args.vocab:
            for mode in modes:
                case = _make_case(torch, min(args.batch, 4), args.gamma, min(V, 512), mode == "greedy", dtype, "cpu")
                t0 = time.perf_counter()
                ref, ker = verify(**case, backend="reference"), verify(**case, backend="triton")
                same = all(torch.equal(a, b) for a, b in zip(ref, ker, strict=True))
                print(f"{mode:8s} V={min(V, 512)}: kernel == reference: {same} ({time.perf_counter() - t0:.2f} s)")
        return
    print(f"device={torch.cuda.get_device_name()} B={args.batch} gamma={args.gamma} dtype={args.dtype}")
    print(f"{'mode':8s} {'V':>7s} {'backend':9s} {'call ms':>8s} {'graph ms':>9s} {'eff GB/s':>9s}")
    for V in args.vocab:
        for mode in modes:
            case = _make_case(torch, args.batch, args.gamma, V, mode == "greedy", dtype, "cuda")
            nbytes = case["target_probs_BK1V"].numel() * case["target_probs_BK1V"].element_size()
            if case["draft_probs_BKV"] is not None:
                nbytes += case["draft_probs_BKV"].numel() * case["draft_probs_BKV"].element_size()
            results = {}
            for backend in ("reference", "triton"):
                fn = lambda b=backend, c=case: verify(**c, backend=b)  # noqa: E731
                call_ms = _time_calls(torch, fn, args.iters)
                graph_ms = _time_graph(torch, fn, args.iters)
                results[backend] = (call_ms, graph_ms)
                print(f"{mode:8s} {V:7d} {backend:9s} {call_ms:8.3f} {graph_ms:9.3f} {nbytes / graph_ms / 1e6:9.0f}")
            same = all(torch.equal(a, b) for a, b in zip(verify(**case, backend="reference"),
                                                           verify(**case, backend="triton"), strict=True))
            (rc, rg), (tc, tg) = results["reference"], results["triton"]
            print(f"{mode:8s} {V:7d} speedup triton/reference: call {rc / tc:.1f}x, graph {rg / tg:.1f}x; "
                  f"outputs identical: {same}")


if __name__ == "__main__":
    main()
