"""What a training run shows and records (rank 0 only).

- `metrics.jsonl` in output_dir: one row per logged step and per held-out evaluation
  (rows past a resumed step are dropped on resume, so the file is the run's one history);
- tensorboard (`output_dir/tensorboard`), wandb (auto = offline without WANDB_API_KEY,
  off disables; WANDB_MODE=disabled in the environment also disables it);
- a tqdm bar with loss, anchor-tokens/s, simulated τ and ETA;
- `loss_curve.png` (train loss, held-out simulated τ) at the end.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from deepspec.runs import atomic_write

if TYPE_CHECKING:
    from deepspec.config import TrainerConfig


def wandb_mode(setting: str) -> Optional[str]:
    """None (no wandb) | "online" | "offline" for trainer.wandb = auto | online | offline | off."""
    setting = {"false": "off", "true": "auto"}.get(str(setting).lower(), str(setting))  # YAML's bare off/on
    if setting not in ("auto", "online", "offline", "off"):
        raise ValueError(f"trainer.wandb={setting!r}; choose auto, online, offline or off")
    if setting == "off" or os.environ.get("WANDB_MODE") == "disabled":
        return None
    if setting == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return setting


class RunLogger:
    """Console bar, metrics.jsonl, tensorboard and wandb for one run; inert on ranks > 0."""

    def __init__(self, output_dir, active: bool, total_steps: int, start_step: int, tr: TrainerConfig,
                 run_name: str = "run", config: Optional[dict] = None):
        """`tr` supplies the sinks: trainer.wandb / wandb_project, trainer.tensorboard, trainer.progress."""
        self.active = active
        self.out = Path(output_dir)
        self.metrics_path = self.out / "metrics.jsonl"
        self.tb = self.wb = self.bar = None
        if not active:
            return
        self._truncate_history(start_step)
        if tr.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out / "tensorboard"))
        mode = wandb_mode(tr.wandb)
        if mode is not None:
            import wandb as wandb_lib

            self.wb = wandb_lib.init(project=tr.wandb_project, name=run_name, dir=str(self.out), mode=mode,
                                     config=config or {}, resume="allow")
        if tr.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def _truncate_history(self, start_step: int) -> None:
        if not self.metrics_path.exists():
            return
        keep = [line for line in self.metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= start_step]
        atomic_write(self.metrics_path, "".join(line + "\n" for line in keep))

    def _record(self, row: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        step = row["step"]
        scalars = {f"{row['kind']}/{k}": v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            for k in ("per_position_acceptance", "per_position_accuracy"):
                for i, v in enumerate(row.get(k, [])):
                    self.tb.add_scalar(f"{row['kind']}/{k}/{i + 1}", v, step)
        if self.wb is not None:
            self.wb.log(scalars, step=step)

    def step(self, step: int, metrics: dict, write: bool) -> None:
        """Advance the bar; record the metrics when `write` (every log_every steps)."""
        if not self.active:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics.get('tokens_per_s', 0):.0f}",
                                 tau=f"{metrics['simulated_tau']:.3f}", refresh=False)
        if write:
            self._record({"kind": "train", "step": step, **metrics})

    def eval(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        self._record({"kind": "heldout", "step": step, **metrics})
        msg = (f"step {step}: held-out simulated tau {metrics['simulated_tau']:.3f}, loss {metrics['loss']:.4f}, "
               f"acceptance by position " + " ".join(f"{a:.2f}" for a in metrics["per_position_acceptance"]))
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def message(self, text: str) -> None:
        if self.active:
            (self.bar.write if self.bar is not None else print)(text)

    def history(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wb is not None:
            self.wb.finish()


def plot_loss_curve(history: list[dict], path) -> Optional[Path]:
    """Train loss and held-out simulated τ against step, as a PNG."""
    train = [(r["step"], r["loss"]) for r in history if r.get("kind") == "train"]
    held = [(r["step"], r["simulated_tau"]) for r in history if r.get("kind") == "heldout"]
    if not train and not held:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    if held:
        ax2 = ax.twinx()
        ax2.plot(*zip(*held), "o-", label="held-out simulated τ", color="tab:orange")
        ax2.set_ylabel("simulated τ")
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
