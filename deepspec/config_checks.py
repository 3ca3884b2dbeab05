"""Checks on a whole composed config that types alone cannot express, run before anything loads.

`deepspec.config.compose` calls `check_config` after merging the recipe into the schema (which
already rejected unknown keys, wrong types and values outside an enumeration), so a run with
`trainer.warmup_ratio=1.5` or a DFlash drafter without a mask token stops in a second with every
problem named, instead of after the target has loaded.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_config(cfg: DictConfig) -> list[str]:
    """Every problem found, each naming its key and what to do (empty when the config is sound)."""
    problems: list[str] = []
    for check in (_drafter, _target, _trainer, _deepspeed, _data, _regen, _loss, _eval):
        try:
            problems += check(cfg)
        except ValueError as exc:
            problems.append(str(exc))
    return problems


def _ranges(section: DictConfig, prefix: str, rules: dict[str, Callable[[Any], bool]], what: dict[str, str]):
    return [f"{prefix}.{key}={section[key]} must be {what[key]}" for key, ok in rules.items()
            if section[key] is not None and not ok(section[key])]


def _drafter(cfg: DictConfig) -> list[str]:
    from deepspec.drafters.registry import check_spec

    check_spec(OmegaConf.to_object(cfg.drafter))
    d = cfg.drafter
    return _ranges(d, "drafter", {"num_layers": lambda v: v >= 1, "block_size": lambda v: v >= 1,
                                  "num_taps": lambda v: v >= 1, "anchors_per_seq": lambda v: v >= 1},
                   dict.fromkeys(("num_layers", "block_size", "num_taps", "anchors_per_seq"), "at least 1"))


def _target(cfg: DictConfig) -> list[str]:
    if not DEVICE.match(cfg.target.device):
        return [f"target.device={cfg.target.device} is not a device; use auto, cpu, cuda or cuda:N"]
    return []


def _trainer(cfg: DictConfig) -> list[str]:
    tr = cfg.trainer
    out = _ranges(tr, "trainer", {
        "lr": lambda v: v > 0, "micro_batch": lambda v: v >= 1, "global_batch": lambda v: v >= 1,
        "warmup_ratio": lambda v: 0 <= v <= 1, "decay_ratio": lambda v: 0 <= v <= 1,
        "min_lr_ratio": lambda v: 0 <= v <= 1, "max_steps": lambda v: v >= 0, "epochs": lambda v: v > 0,
        "grad_clip": lambda v: v >= 0, "keep_last": lambda v: v >= 1}, {
        "lr": "positive", "micro_batch": "at least 1", "global_batch": "at least 1",
        "warmup_ratio": "in [0, 1]", "decay_ratio": "in [0, 1]", "min_lr_ratio": "in [0, 1]",
        "max_steps": "0 (derive from epochs) or more", "epochs": "positive", "grad_clip": "0 (off) or more",
        "keep_last": "at least 1"})
    if tr.micro_batch >= 1 and tr.global_batch % tr.micro_batch:
        out.append(f"trainer.global_batch={tr.global_batch} is not a multiple of trainer.micro_batch="
                   f"{tr.micro_batch} (global = micro x gradient accumulation x ranks)")
    if len(tr.betas) != 2 or not all(0 <= b < 1 for b in tr.betas):
        out.append(f"trainer.betas={list(tr.betas)} must be two numbers in [0, 1)")
    return out


def _deepspeed(cfg: DictConfig) -> list[str]:
    ds = cfg.deepspeed
    if ds.zero_stage not in (0, 1, 2, 3):
        return [f"deepspeed.zero_stage={ds.zero_stage}; choose 0, 1, 2 or 3 (or the group: "
                f"deepspeed=none|zero1|zero2|zero3)"]
    if ds.offload_param and ds.zero_stage != 3:
        return [f"deepspeed.offload_param=true needs ZeRO stage 3 (deepspeed=zero3), not {ds.zero_stage}"]
    return []


def _data(cfg: DictConfig) -> list[str]:
    out = _ranges(cfg.data, "data",
                  {"heldout_fraction": lambda v: 0 <= v < 1, "max_seq_len": lambda v: v >= 2},
                  {"heldout_fraction": "in [0, 1)", "max_seq_len": "at least 2"})
    for name in ("data", "quickstart"):
        sources, weights = cfg[name].sources, cfg[name].weights
        if weights is not None and len(weights) != len(sources):
            out.append(f"{name}.weights has {len(weights)} entries for {len(sources)} {name}.sources "
                       f"{list(sources)}")
    return out


def _regen(cfg: DictConfig) -> list[str]:
    at_least_one = ("batch_size", "concurrency", "max_new_tokens")
    rules = {**{k: (lambda v: v >= 1) for k in at_least_one}, "retries": lambda v: v >= 0,
             "max_error_fraction": lambda v: 0 <= v <= 1, "temperature": lambda v: v >= 0,
             "top_p": lambda v: 0 < v <= 1}
    what = {**dict.fromkeys(at_least_one, "at least 1"), "retries": "0 or more",
            "max_error_fraction": "in [0, 1]", "temperature": "0 (greedy) or more", "top_p": "in (0, 1]"}
    return _ranges(cfg.regen, "regen", rules, what)


def _loss(cfg: DictConfig) -> list[str]:
    keys = ("alpha_ce", "alpha_tv", "alpha_conf", "keep_probs_mb")
    out = _ranges(cfg.loss, "loss", {k: (lambda v: v >= 0) for k in keys}, dict.fromkeys(keys, "0 or more"))
    return out + _ranges(cfg.loss, "loss", {"vocab_chunk": lambda v: v >= 1, "gamma_w": lambda v: v > 0},
                         {"vocab_chunk": "at least 1", "gamma_w": "positive (or null: the block size)"})


def _eval(cfg: DictConfig) -> list[str]:
    from deepspec.eval.benchmarks import SHIPPED_DIR, shipped_benchmarks

    ev = cfg.eval
    out = _ranges(ev, "eval", {"confidence_threshold": lambda v: 0 <= v <= 1, "block_size": lambda v: v >= 1,
                               "calibration_fit_fraction": lambda v: 0 < v < 1},
                  {"confidence_threshold": "in [0, 1]", "block_size": "at least 1",
                   "calibration_fit_fraction": "in (0, 1)"})
    if not all(0 <= t <= 1 for t in ev.thresholds):
        out.append(f"eval.thresholds={list(ev.thresholds)} must all lie in [0, 1]")
    shipped = shipped_benchmarks()
    for name in list(ev.benchmarks) + list(cfg.quickstart.benchmarks):
        if name not in shipped and "/" not in name and not name.endswith(".jsonl"):
            close = difflib.get_close_matches(name, shipped, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            out.append(f"benchmark '{name}' is not shipped in {SHIPPED_DIR}; {hint}(shipped: "
                       f"{' | '.join(shipped)}; or give a path to a JSONL file)")
    return out
