"""What the CPU data benchmarks share: the --target / --threads options and loading the target."""

from __future__ import annotations

import argparse

import torch

THREADS_HELP = ("torch intra-op threads (0 = torch default); on a CPU shared with other jobs, 1 avoids "
                "OpenMP spin-wait collapse (measured 20x slower at 2 threads under load)")


def add_target_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=0, help=THREADS_HELP)


def load_cpu_target(args: argparse.Namespace):
    """Apply --threads, say how many threads run, and load --target on the CPU (with its tokenizer)."""
    from deepspec.targets import load_target

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}")
    return load_target(args.target, name=args.target, device="cpu")
