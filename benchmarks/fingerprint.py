"""What identifying the target by content costs: the weights fingerprint (deepspec.guards) next to
loading the target it fingerprints, and next to hashing every byte of its weights.

    python benchmarks/fingerprint.py [--target embedded:smollm2-135m-instruct] [--threads 1] [--repeats 5]

Prints the load time, the fingerprint time (median of --repeats), a full sha256 over every
parameter's bytes (the alternative the sample replaces) and the ratios.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time

import torch
from _common import add_target_args, load_cpu_target

from deepspec.guards import weights_fingerprint


def full_hash(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_target_args(parser)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    t0 = time.perf_counter()
    target = load_cpu_target(args)
    load_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in target.model.parameters())
    sample_s, full_s = [], []
    for _ in range(args.repeats):  # side by side, alternating
        t0 = time.perf_counter()
        fp = weights_fingerprint(target.model)
        sample_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        full_hash(target.model)
        full_s.append(time.perf_counter() - t0)
    sample, full = statistics.median(sample_s), statistics.median(full_s)
    print(f"target {args.target}: {n_params / 1e6:.1f}M parameters, dtype {target.dtype}, fingerprint {fp}")
    print(f"load {load_s:.2f} s | sampled fingerprint {sample * 1e3:.1f} ms | full sha256 {full * 1e3:.1f} ms")
    print(f"fingerprint / load = {sample / load_s:.4f}   fingerprint / full sha256 = {sample / full:.4f}")


if __name__ == "__main__":
    main()
