"""Run `deepspec.training.train.train` on a tiny random target with target-generated data.

Used by the trainer's integration tests, in-process (`run_tiny`) or as a script under
`python` / `torchrun` (each process builds the same tiny target and data):

    python tests/integration/train_driver.py OUTPUT_DIR [--kill-after-batches N] [override ...]

`--kill-after-batches N` SIGKILLs the process from inside the data source when it is asked
for its (N+1)-th training micro-batch: an abrupt death in the middle of a run, after
whatever checkpoints were due, with no cleanup of any kind.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.tiny import SIZES as TINY  # noqa: E402
from tests.tiny import tiny_target as make_tiny_target  # noqa: E402

TINY_LLAMA = TINY["llama"]
NUM_TRAIN, NUM_HELDOUT = 32, 8


def tiny_overrides(recipe: str = "dspark_smollm2", output_dir: str = "runs/tiny", extra: list[str] = ()) -> list[str]:
    """A recipe composed onto the tiny random llama: small drafter, small batches, fast steps."""
    base = [f"recipe={recipe}", "target.source=random:llama", "target.name=tiny-llama", "target.tokenizer=null",
            "target.device=cpu", *[f"+target.random_config.{k}={v}" for k, v in TINY_LLAMA.items()],
            "drafter.num_layers=1", "drafter.markov_rank=16", "drafter.anchors_per_seq=8",
            "loss.vocab_chunk=100", "trainer.global_batch=8", "trainer.micro_batch=4", "trainer.max_steps=6",
            "trainer.log_every=1", "trainer.eval_every=3", "trainer.eval_sequences=8", "trainer.save_every=3",
            "trainer.keep_last=5", "trainer.tensorboard=false", "trainer.progress=false", "trainer.wandb=off",
            f"output_dir={output_dir}"]
    if recipe.startswith("eagle3"):
        base += ["drafter.draft_vocab_size=128", "drafter.max_seq_len=64"]
    else:
        base += [f"drafter.mask_token_id={TINY_LLAMA['vocab_size'] - 1}"]
    return base + list(extra)


class KillingSource:
    """Wraps a feature source; SIGKILLs this process on training micro-batch number `kill_after + 1`."""

    def __init__(self, inner, kill_after: int):
        self.inner, self.kill_after, self.calls = inner, kill_after, 0
        self.identity = inner.identity

    def __len__(self):
        return len(self.inner)

    def get_batch(self, indices):
        self.calls += 1
        if self.calls > self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner.get_batch(indices)


def run_tiny(overrides: list[str], kill_after_batches: int | None = None) -> dict:
    from deepspec.config import compose, section
    from deepspec.drafters import resolve_spec
    from deepspec.runs import prepare_output_dir, write_summary
    from deepspec.training.synthetic import TargetGeneratedSource
    from deepspec.training.train import train

    cfg = compose(overrides)
    prepare_output_dir(cfg)
    target = make_tiny_target("llama")
    layer_ids = resolve_spec(section(cfg, "drafter"), target.shapes).layer_ids
    train_src = TargetGeneratedSource(target, layer_ids, NUM_TRAIN, seed=1)
    heldout = TargetGeneratedSource(target, layer_ids, NUM_HELDOUT, seed=2)
    if kill_after_batches is not None:
        train_src = KillingSource(train_src, kill_after_batches)
    summary = train(cfg, target, train_src, heldout)
    write_summary(cfg.output_dir, summary)
    return summary


def train_losses(output_dir) -> dict[int, float]:
    rows = [json.loads(x) for x in (Path(output_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


if __name__ == "__main__":
    args = sys.argv[1:]
    out, kill = args.pop(0), None
    if args and args[0] == "--kill-after-batches":
        kill = int(args[1])
        args = args[2:]
    recipe = next((a.split("=", 1)[1] for a in args if a.startswith("recipe=")), "dspark_smollm2")
    run_tiny(tiny_overrides(recipe, out, [a for a in args if not a.startswith("recipe=")]), kill)
