"""Build what an eval command needs from the composed config: drafter, STS temperatures, scheduler.

The one place where `eval.*` settings become typed objects (STYLE: instantiation from config
happens in one place per command); the engine and metrics take plain arguments.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from deepspec.decoding.engine import BudgetFn
from deepspec.decoding.sampling import SamplingParams
from deepspec.drafters.io import STS_FILE, read_sts, resolve_draft_dir  # noqa: F401  (STS_FILE: calibrate)
from deepspec.eval.evaluate import DecodeSettings
from deepspec.targets.frozen import FrozenTarget

SCHEDULERS = ("none", "algorithm1", "topk")


def load_eval_drafter(target: FrozenTarget, draft_dir: str | None) -> torch.nn.Module:
    """The drafter saved in `draft_dir`, on the target's device and in its dtype, sharing its embedding
    and LM head."""
    from deepspec.drafters.io import load_drafter

    path = resolve_draft_dir(draft_dir)
    drafter = load_drafter(path, target.embed_tokens, target.lm_head_weight, map_location=str(target.device))
    drafter = drafter.to(target.dtype)  # the drafter decodes in the eval dtype, like the target
    shapes = drafter.shapes
    if shapes.vocab_size != target.vocab_size or shapes.hidden_size != target.hidden_size:
        raise ValueError(f"draft={draft_dir} was built for a target with vocab {shapes.vocab_size} x hidden "
                         f"{shapes.hidden_size}; {target.name} has {target.vocab_size} x {target.hidden_size}")
    return drafter.eval()


def sts_path(setting: str, draft_dir: str | None) -> Path | None:
    """eval.sts: 'auto' = DRAFT/sts.json when it exists, 'none' = off, else a path to a sts.json."""
    if setting == "none":
        return None
    if setting == "auto":
        path = resolve_draft_dir(draft_dir) / STS_FILE if draft_dir else None
        return path if path is not None and path.is_file() else None
    path = Path(setting)
    if not path.is_file():
        raise FileNotFoundError(f"eval.sts={setting}: no such file (write one with `deepspec eval calibrate`)")
    return path


def load_sts(path: Path | None) -> torch.Tensor | None:
    if path is None:
        return None
    return torch.tensor(read_sts(path), dtype=torch.float64)


def save_sts(path: Path, temperatures: list[float], block_size: int, rounds: int, report: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"temperatures": temperatures, "block_size": block_size, "fitted_on_rounds": rounds,
               "overall": report.get("overall", {})}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def make_budget_fn(scheduler: str, sps_table: str | None) -> BudgetFn | None:
    """The prefix scheduler in the decoding loop (deepspec.decoding.scheduler), or None."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"eval.scheduler={scheduler!r}; choose one of {SCHEDULERS}")
    if scheduler == "none":
        return None
    from deepspec.decoding.scheduler import SPSTable, budget_from_stale, schedule_prefixes, topk_prefixes

    if not sps_table:
        raise ValueError(f"eval.scheduler={scheduler} needs eval.sps_table=PATH: run `deepspec eval profile "
                         f"output_dir=S` first and pass S/sps.json")
    sps = SPSTable.load_json(sps_table)
    history: list[torch.Tensor] = []

    def budget(conf_BK: torch.Tensor, active_B: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(conf_BK.shape[0], dtype=torch.long)
        rows = active_B.nonzero().flatten()
        if rows.numel() == 0:
            return out
        conf = conf_BK[rows]
        if scheduler == "algorithm1":
            out[rows] = schedule_prefixes(conf, sps)
        else:  # budget sized from confidences two rounds old, then the top-K current candidates
            stale = history[-2] if len(history) >= 2 and history[-2].shape == conf.shape else conf
            out[rows] = topk_prefixes(conf, budget_from_stale(stale, sps))
            history[:] = (history + [conf])[-2:]
        return out

    return budget


def parse_block_size(value) -> int | str | None:
    """eval.block_size: None, a positive int, or 'auto'."""
    if value is None or value == "auto":
        return value
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if size < 1 or str(value).strip() != str(size):
        raise ValueError(f"eval.block_size={value!r}; use a positive number of drafts per round, 'auto' "
                         f"(chosen from measured costs and acceptance) or null (the drafter's block size)")
    return size


def fixed_block_size(value, drafter_block_size: int, command: str) -> int:
    """eval.block_size for commands that need a number now ('auto' is chosen by `deepspec eval` only)."""
    size = parse_block_size(value)
    if size == "auto":
        raise ValueError(f"eval.block_size=auto is chosen by `deepspec eval`; `{command}` needs a number "
                         f"(or null for the drafter's block size {drafter_block_size})")
    return int(size or drafter_block_size)


def decode_settings(ev, budget_fn: BudgetFn | None, sts: torch.Tensor | None) -> DecodeSettings:
    """DecodeSettings from the `eval` config section (block_size=auto is left None: the caller chooses)."""
    if ev.batch_size < 1:
        raise ValueError(f"eval.batch_size={ev.batch_size}; use 1 or more")
    block_size = parse_block_size(ev.block_size)
    return DecodeSettings(max_new_tokens=int(ev.max_new_tokens),
                          sampling=SamplingParams(float(ev.temperature), float(ev.top_p), int(ev.top_k)),
                          batch_size=int(ev.batch_size),
                          block_size=None if block_size == "auto" else block_size,
                          confidence_threshold=ev.confidence_threshold, budget_fn=budget_fn,
                          sts_temperatures=sts, kernel=ev.kernel, seed=int(ev.seed),
                          thinking=bool(ev.thinking))


def parse_batch_sizes(batch_sizes, batch_size: int) -> list[int]:
    """eval.batch_sizes (the concurrency sweep; [] = eval.batch_size alone): positive, no repeats."""
    sizes = [int(b) for b in batch_sizes] if batch_sizes else [int(batch_size)]
    bad = [b for b in sizes if b < 1]
    if bad or len(set(sizes)) != len(sizes):
        raise ValueError(f"eval.batch_sizes={list(batch_sizes)}: give distinct batch sizes of 1 or more, "
                         f"e.g. eval.batch_sizes=[1,2,4,8]")
    return sizes


def eval_target(cfg, batch_size: int | None = None):
    """The target in the eval dtype (`eval.target_dtype`): (target, dtype name, why that dtype).

    One dtype for the whole run: `auto` is resolved for the largest batch size evaluated
    (`batch_size`, default eval.batch_size), so every row of a concurrency sweep decodes in the
    same dtype and stays bit-exact against target-only decoding.
    """
    from omegaconf import OmegaConf

    from deepspec.eval.dtype import resolve_eval_dtype
    from deepspec.targets import target_from_config
    from deepspec.targets.loading import pick_device

    device = "cpu" if cfg.target.device_map else pick_device(cfg.target.device)
    dtype, why = resolve_eval_dtype(cfg.eval.target_dtype, cfg.target.dtype, device,
                                   batch_size=int(batch_size or cfg.eval.batch_size))
    if dtype != cfg.target.dtype:
        cfg = OmegaConf.merge(cfg, {"target": {"dtype": dtype}})
    target = target_from_config(cfg)
    loaded = str(target.dtype).removeprefix("torch.")
    if loaded != dtype:  # a target shared with an earlier stage keeps its own dtype
        why, dtype = f"{why}; the loaded target is {loaded}", loaded
    return target, dtype, why
