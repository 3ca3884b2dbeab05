"""`deepspec eval calibrate`: fit the confidence head's STS temperatures and store them with the drafter.

Also the calibration part of `deepspec eval`: from the recorded speculative rounds (raw
confidence logits of every drafted position, accepted length, drafts verified), a
deterministic split fits sequential temperature scaling on one part and scores it on the
other (ECE / AUC / Brier before and after, reliability PNG), and replays the scored part at
each confidence threshold (tokens verified per round, acceptance rate, τ).
The math lives in deepspec.decoding.calibration; this module feeds it rounds and writes files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig

from deepspec.decoding.calibration import (
    calibration_report,
    fit_sts,
    reliability_diagram_png,
    threshold_sweep,
)
from deepspec.decoding.engine import RoundLog
from deepspec.runs import format_table, print0

MIN_ROUNDS = 8


def rounds_tensors(log: RoundLog, K: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(conf_logits_RK, accepted_R, num_proposed_R) of rounds that carry confidences, or None.

    A round cut by an accepted EOS tested nothing after it: its proposed count is cut to the
    accepted length, so calibration never scores positions that were not verified.
    """
    if not log.conf_logits:
        return None
    conf = torch.tensor([row[:K] for row in log.conf_logits], dtype=torch.float64)
    accepted = torch.tensor(log.accepted, dtype=torch.long)
    proposed = torch.tensor(log.proposed, dtype=torch.long)
    eos = torch.tensor(log.eos_stop, dtype=torch.bool)
    proposed = torch.where(eos, accepted, proposed)
    return conf, accepted, proposed


def split_rounds(num_rounds: int, fit_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (fit, score) round indices."""
    if not 0.0 < fit_fraction < 1.0:
        raise ValueError(f"eval.calibration_fit_fraction={fit_fraction}; it must lie strictly between 0 and 1")
    order = torch.randperm(num_rounds, generator=torch.Generator().manual_seed(seed))
    n_fit = min(max(int(round(fit_fraction * num_rounds)), 1), num_rounds - 1)
    return order[:n_fit], order[n_fit:]


def calibrate_rounds(log: RoundLog, K: int, thresholds: Sequence[float], out_dir: Path,
                     fit_fraction: float = 0.5, seed: int = 0) -> dict | None:
    """Fit STS on part of the rounds, score on the rest, sweep thresholds; write PNGs. None if impossible."""
    data = rounds_tensors(log, K)
    if data is None:
        return None
    conf, accepted, proposed = data
    R = conf.shape[0]
    if R < MIN_ROUNDS:
        return {"skipped": f"only {R} rounds with confidences; calibration needs at least {MIN_ROUNDS}"}
    fit_idx, score_idx = split_rounds(R, fit_fraction, seed)
    temps = fit_sts(conf[fit_idx], accepted[fit_idx], num_proposed_R=proposed[fit_idx])
    report = calibration_report(conf[score_idx], accepted[score_idx], temps, num_proposed_R=proposed[score_idx])
    out_dir = Path(out_dir)
    png = reliability_diagram_png(out_dir / "reliability.png", conf[score_idx], accepted[score_idx], temps,
                                  num_proposed_R=proposed[score_idx],
                                  title=f"Confidence calibration: STS fitted on {len(fit_idx)} rounds, "
                                        f"scored on {len(score_idx)}")
    sweep = threshold_sweep(conf[score_idx], accepted[score_idx], list(thresholds), temperatures_K=temps,
                            num_proposed_R=proposed[score_idx])
    return {"temperatures": report["temperatures"], "fit_rounds": len(fit_idx), "score_rounds": len(score_idx),
            "overall": report["overall"], "per_position": report["per_position"], "threshold_sweep": sweep,
            "reliability_png": str(png)}


def run(cfg: DictConfig) -> dict:
    """Decode eval.benchmarks speculatively, fit STS on the recorded rounds, write DRAFT/sts.json.

    deepspec eval calibrate recipe=dspark_smollm2 draft=CKPT eval.benchmarks=[gsm8k] eval.max_prompts=16
    Later `deepspec eval` runs read DRAFT/sts.json (eval.sts=auto) for the confidence threshold
    and the scheduler. Writes output_dir/reliability.png and summary.json.
    """
    from deepspec.config import section
    from deepspec.eval.benchmarks import load_benchmark
    from deepspec.eval.evaluate import run_benchmark
    from deepspec.eval.metrics import merge_logs
    from deepspec.eval.setup import STS_FILE, decode_settings, load_eval_drafter, resolve_draft_dir, save_sts
    from deepspec.targets import target_from_config

    ev = section(cfg, "eval")
    target = target_from_config(cfg)
    drafter = load_eval_drafter(target, cfg.draft)
    if getattr(drafter, "confidence", None) is None:
        raise ValueError(f"draft={cfg.draft} has no confidence head (kind={drafter.spec.kind}); STS calibrates "
                         f"the DSpark confidence head only")
    settings = decode_settings(ev, budget_fn=None, sts=None)  # full proposals: no threshold, no scheduler
    settings.confidence_threshold = None
    logs = []
    for name in ev.benchmarks:
        bench = load_benchmark(name, ev.max_prompts)
        logs.append(run_benchmark(target, drafter, bench, settings, baseline=False).rounds)
    K = int(settings.block_size or drafter.spec.block_size)
    result = calibrate_rounds(merge_logs(logs), K, ev.thresholds, Path(cfg.output_dir),
                              ev.calibration_fit_fraction, ev.seed)
    if result is None or "skipped" in result:
        raise RuntimeError(f"calibration impossible: {result['skipped'] if result else 'no confidences recorded'}; "
                           f"raise eval.max_prompts or eval.max_new_tokens")
    path = save_sts(resolve_draft_dir(cfg.draft) / STS_FILE, result["temperatures"], K, result["fit_rounds"],
                    result)
    o = result["overall"]
    print0(format_table([{"metric": m, "raw": o[f"{m}_before"], "STS": o[f"{m}_after"]}
                         for m in ("ece", "auc", "brier")]))
    print0(f"STS temperatures {[round(t, 3) for t in result['temperatures']]} -> {path}")
    return {"sts_path": str(path), **result}
