"""Ablations of the protocol settings the reference trainer chose differently, on SmolLM2 (CPU).

    python benchmarks/protocol_ablation.py --out runs/ablation prepare   # conversations + 2 feature caches
    python benchmarks/protocol_ablation.py --out runs/ablation fp8       # final-feature TV / argmax flips
    python benchmarks/protocol_ablation.py --out runs/ablation vocab     # Eagle3 vocabulary coverage
    python benchmarks/protocol_ablation.py --out runs/ablation train --steps 40 --jobs 7   # training runs
    python benchmarks/protocol_ablation.py --out runs/ablation report    # the table of every finished run

Data: `--rows` GSM8K training questions (data_tools/assets), chosen and split train / held-out by
`deepspec data prompts`, with their reference answers as the assistant turn (regenerating answers
with SmolLM2 costs ~25 tokens/s on this CPU); features of SmolLM2-135M-Instruct (bf16 target,
fp32 storage) in one cache per tap set (DSpark's 5 taps, Eagle3's 3).

- fp8: p_t = softmax(final @ W_lm) from the fp32 target's final hidden state against the same after
  a bf16 and an fp8 (e4m3, per-row scale) round trip of that state: mean total variation
  0.5·||p - p̃||_1 and the share of positions whose argmax changes, over supervised tokens of
  held-out sequences.
- vocab: share of the held-out supervised tokens an Eagle3 draft vocabulary of N tokens holds, the
  vocabulary counted over the first 64 training sequences (the old rule) or all of them (the new).
- train: `deepspec train` runs at equal steps from the same cache, one setting changed at a time
  from the new defaults, plus the new defaults with another seed (the noise); held-out simulated τ
  at the end (the trainer's own evaluation on the held-out split).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from deepspec.runs import format_table  # noqa: E402

RUNS = {  # name -> (recipe, overrides); every run also gets the common settings below
    "dspark new defaults": ("dspark_smollm2", []),
    "dspark new defaults, seed 1": ("dspark_smollm2", ["seed=1"]),
    "dspark gamma_w 7 (block size)": ("dspark_smollm2", ["loss.gamma_w=null"]),
    "dspark gamma_w 7 (block size), seed 1": ("dspark_smollm2", ["loss.gamma_w=null", "seed=1"]),
    "dspark betas (0.9, 0.999)": ("dspark_smollm2", ["trainer.betas=[0.9,0.999]"]),  # CPU default: 0.95
    "dspark betas (0.9, 0.999), seed 1": ("dspark_smollm2", ["trainer.betas=[0.9,0.999]", "seed=1"]),
    "eagle3 per-sequence mean": ("eagle3_smollm2", []),
    "eagle3 per-sequence mean, seed 1": ("eagle3_smollm2", ["seed=1"]),
    "eagle3 token mean": ("eagle3_smollm2", ["loss.eagle3_normalise=token"]),
    "eagle3 token mean, seed 1": ("eagle3_smollm2", ["loss.eagle3_normalise=token", "seed=1"]),
}
# CPU budget (a 2-core machine shared with other jobs): one micro-batch of 4 sequences per step, 16
# DSpark anchors per sequence, Eagle3 rows cut at 128 tokens with a 4,096-token pruned head
BUDGET = ["trainer.global_batch=4", "trainer.micro_batch=4", "trainer.eval_sequences=16"]
COMMON = {"dspark_smollm2": BUDGET + ["drafter.anchors_per_seq=16"],
          "eagle3_smollm2": BUDGET + ["drafter.draft_vocab_size=4096", "drafter.max_seq_len=128"]}


def slug(name: str) -> str:
    """A run's folder name (no character Hydra would read in an override)."""
    return "".join({" ": "_", "=": "_", ",": "", "(": "", ")": ""}.get(c, c) for c in name)


def deepspec(*args: str, log: Path) -> None:
    exe = shutil.which("deepspec") or str(Path(sys.executable).with_name("deepspec"))
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    with open(log, "w") as f:
        proc = subprocess.run(["nice", exe, *args], stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        raise SystemExit(f"`deepspec {' '.join(args)}` failed ({proc.returncode}); see {log}")


def prepare(out: Path, rows: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    deepspec("data", "prompts", "recipe=dspark_smollm2", "data.sources=[gsm8k]", f"data.max_rows={rows}",
             "data.heldout_fraction=0.125", f"output_dir={out / 'prompts'}", log=out / "prompts.log")
    with open(out / "conversations.jsonl", "w") as f:
        for name in ("train", "heldout"):
            for line in (out / "prompts" / f"{name}.jsonl").read_text().splitlines():
                row = json.loads(line)
                row["messages"].append({"role": "assistant", "content": row["meta"]["answer"]})
                row["split"] = name
                f.write(json.dumps(row) + "\n")
    for recipe, cache in (("dspark_smollm2", "cache_dspark"), ("eagle3_smollm2", "cache_eagle3")):
        t0 = time.perf_counter()
        deepspec("data", "features", f"recipe={recipe}", f"input={out / 'conversations.jsonl'}",
                 f"output_dir={out / cache}", "target.dtype=bfloat16", "features.dtype=fp32",
                 log=out / f"{cache}.log")
        print(f"{cache}: {time.perf_counter() - t0:.0f} s")


def fp8(out: Path, sequences: int) -> None:
    from data_tools.cache import decode, encode
    from data_tools.features import extract_features
    from data_tools.tokenize import load_sequences
    from deepspec.targets import load_target

    torch.set_num_threads(1)
    target = load_target("embedded:smollm2-135m-instruct", device="cpu")  # fp32
    seqs, _, _ = load_sequences(out / "conversations.jsonl", target.tokenizer, 512)
    held = [s for s in seqs if s.split == "heldout"][:sequences]
    feats = extract_features(target, [1], held, 4096)
    final = torch.cat([f.final_TD[f.loss_mask_T] for f in feats]).float()
    W = target.lm_head_weight.float()
    p = torch.softmax(final @ W.T, -1)
    rows = []
    for name, dtype in (("bf16 (fp8 cache now)", "bf16"), ("fp16", "fp16"),
                        ("fp8 e4m3 (fp8 cache before)", "fp8")):
        q = torch.softmax(decode(*encode(final, dtype)) @ W.T, -1)
        tv = 0.5 * (p - q).abs().sum(-1)
        flips = (p.argmax(-1) != q.argmax(-1)).float().mean()
        rows.append({"final hidden stored as": name, "mean TV(p_t, p~_t)": f"{tv.mean():.4f}",
                     "p95 TV": f"{tv.quantile(0.95):.4f}", "argmax flips": f"{flips:.2%}"})
    print(f"{len(held)} held-out sequences, {final.shape[0]} supervised positions, fp32 SmolLM2-135M")
    print(format_table(rows))
    (out / "fp8.json").write_text(json.dumps(rows, indent=1))


def vocab(out: Path, sizes: list[int]) -> None:
    from data_tools.features import open_feature_splits
    from deepspec.drafters.eagle3 import build_vocab_map, count_supervised_tokens, vocab_coverage

    train, held = open_feature_splits(out / "cache_eagle3", None, [], "cache")
    V = 49152
    t0 = time.perf_counter()
    every = count_supervised_tokens(train, V)
    secs = time.perf_counter() - t0
    first = count_supervised_tokens(type(train)(train.source, train.indices[:64]), V)
    held_counts = count_supervised_tokens(held, V)
    rows = []
    for n in sizes:
        old, new = (vocab_coverage(held_counts, build_vocab_map(c, n)[1]) for c in (first, every))
        rows.append({"draft vocab": n, "first 64 sequences": f"{old:.2%}",
                     "every training sequence": f"{new:.2%}"})
    print(f"held-out coverage of {int(held_counts.sum())} supervised tokens; counted {int(every.sum())} "
          f"training tokens of {len(train)} sequences from the cache's id/mask columns in {secs:.2f} s "
          f"({int(first.sum())} tokens in the first 64)")
    print(format_table(rows))
    (out / "vocab.json").write_text(json.dumps(rows, indent=1))


def train(out: Path, steps: int, jobs: int, only: list[str]) -> None:
    def one(name: str) -> None:
        recipe, overrides = RUNS[name]
        run_dir = out / "runs" / slug(name)
        if (run_dir / "summary.json").exists():
            return
        cache = out / ("cache_eagle3" if recipe.startswith("eagle3") else "cache_dspark")
        t0 = time.perf_counter()
        run_dir.mkdir(parents=True, exist_ok=True)
        deepspec("train", f"recipe={recipe}", f"input={cache}", f"output_dir={run_dir}",
                 f"trainer.max_steps={steps}", "trainer.eval_every=0", "trainer.save_every=0",
                 "trainer.progress=false", "trainer.tensorboard=false",
                 *COMMON[recipe], *overrides, log=run_dir.parent / f"{run_dir.name}.log")
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)

    names = [n for n in RUNS if not only or any(o in n for o in only)]
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, names))
    report(out)


def report(out: Path) -> None:
    rows = []
    for name in RUNS:
        run_dir = out / "runs" / slug(name)
        if not (run_dir / "summary.json").exists():
            continue
        s = json.loads((run_dir / "summary.json").read_text())
        rows.append({"run": name, "steps": s["steps"], "initial tau": f"{s['initial_simulated_tau']:.4f}",
                     "held-out simulated tau": f"{s['final_simulated_tau']:.4f}",
                     "held-out loss": f"{s['heldout_loss']:.4f}",
                     "acc@1": f"{s['per_position_acceptance'][0]:.3f}",
                     "train s": s["train_time_s"]})
    print(format_table(rows) if rows else "no finished run")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/protocol_ablation"))
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare").add_argument("--rows", type=int, default=320)
    sub.add_parser("fp8").add_argument("--sequences", type=int, default=32)
    sub.add_parser("vocab").add_argument("--sizes", type=int, nargs="+",
                                         default=[1024, 2048, 4096, 8192, 16384])
    t = sub.add_parser("train")
    t.add_argument("--steps", type=int, default=40)
    t.add_argument("--jobs", type=int, default=7)
    t.add_argument("--only", nargs="*", default=[], help="run only the runs whose name contains one of these")
    sub.add_parser("report")
    a = p.parse_args()
    if a.cmd == "prepare":
        prepare(a.out, a.rows)
    elif a.cmd == "fp8":
        fp8(a.out, a.sequences)
    elif a.cmd == "vocab":
        vocab(a.out, a.sizes)
    elif a.cmd == "train":
        train(a.out, a.steps, a.jobs, a.only)
    else:
        report(a.out)


if __name__ == "__main__":
    main()
