"""Confidence-head calibration: metrics, sequential temperature scaling, threshold sweep.

The DSpark confidence head gives, per draft position k, c_k = P(x_k survives | x_<k
survived) as a logit.  What serving uses is the prefix-survival probability
a_k = prod_{i<=k} c_i, so calibration is judged on a_k against the realised event
"positions 1..k were all accepted" (accepted_len >= k), counting only rounds in which
position k was actually proposed (docs/engine.md).

Shapes: R rounds (held-out verification rounds), K draft positions.  Positions are
1-based in reports and 0-based as tensor columns.  A round's outcome is given either
as accepted_len_R (number of accepted drafts) or directly as survival_RK (0/1).
Positions that were not proposed are excluded through ``num_proposed_R`` and/or by
NaN logits.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

DEFAULT_BINS = 15


# ---------------------------------------------------------------- metrics


def _flat_pair(prob_N: torch.Tensor, outcome_N: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    prob, outcome = prob_N.detach().double().flatten(), outcome_N.detach().double().flatten()
    if prob.numel() != outcome.numel():
        raise ValueError(f"{name}: prob_N has {prob.numel()} entries but outcome_N has {outcome.numel()}")
    return prob, outcome


def ece(prob_N: torch.Tensor, outcome_N: torch.Tensor, bins: int = DEFAULT_BINS) -> float:
    """Expected calibration error with ``bins`` equal-width bins on [0, 1] (nan if empty)."""
    prob, outcome = _flat_pair(prob_N, outcome_N, "ece")
    return float(_ece_grid(prob[None], outcome, bins)[0])


def _ece_grid(prob_GN: torch.Tensor, outcome_N: torch.Tensor, bins: int) -> torch.Tensor:
    """ECE of G candidate probability vectors against one outcome vector, at once."""
    G, N = prob_GN.shape
    if N == 0:
        return torch.full((G,), float("nan"), dtype=torch.float64)
    bin_GN = (prob_GN * bins).long().clamp(0, bins - 1)
    zeros = torch.zeros(G, bins, dtype=torch.float64)
    prob_sum = zeros.scatter_add(1, bin_GN, prob_GN)
    outcome_sum = zeros.scatter_add(1, bin_GN, outcome_N.expand(G, N))
    return (prob_sum - outcome_sum).abs().sum(1) / N  # sum_b n_b/N * |mean_p - mean_y|


def brier(prob_N: torch.Tensor, outcome_N: torch.Tensor) -> float:
    """Mean squared error between probabilities and 0/1 outcomes (nan if empty)."""
    prob, outcome = _flat_pair(prob_N, outcome_N, "brier")
    return float(((prob - outcome) ** 2).mean()) if prob.numel() else float("nan")


def auc(score_N: torch.Tensor, outcome_N: torch.Tensor) -> float:
    """ROC AUC from ranks (Mann-Whitney U, ties get average ranks); nan if one class is absent."""
    score, outcome = _flat_pair(score_N, outcome_N, "auc")
    positive = outcome > 0.5
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    sorted_score, order = torch.sort(score)
    _, inverse, counts = torch.unique_consecutive(sorted_score, return_inverse=True, return_counts=True)
    last_rank = torch.cumsum(counts, 0).double()  # ranks are 1-based
    mean_rank = last_rank - (counts.double() - 1) / 2
    ranks = torch.empty_like(score)
    ranks[order] = mean_rank[inverse]
    u_stat = ranks[positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u_stat / (n_pos * n_neg))


# ---------------------------------------------------------------- rounds -> targets


def survival_targets(outcome: torch.Tensor, K: int) -> torch.Tensor:
    """survival_RK (float 0/1): 1 where positions 1..k were all accepted.

    ``outcome`` is accepted_len_R (1-D, number of accepted drafts) or survival_RK (2-D).
    """
    if outcome.dim() == 1:
        return (torch.arange(K)[None, :] < outcome.long()[:, None]).double()
    if outcome.dim() == 2 and outcome.shape[1] == K:
        return outcome.double()
    raise ValueError(
        f"outcome must be accepted_len_R (1-D) or survival_RK with K={K} columns, got shape {tuple(outcome.shape)}"
    )


def proposed_mask(conf_logits_RK: torch.Tensor, num_proposed_R: torch.Tensor | None = None) -> torch.Tensor:
    """True where position k was proposed: finite logits at 1..k and k < num_proposed (if given)."""
    mask = torch.isfinite(conf_logits_RK)
    if num_proposed_R is not None:
        mask &= torch.arange(conf_logits_RK.shape[1])[None, :] < num_proposed_R.long()[:, None]
    return torch.cumprod(mask.long(), dim=1).bool()  # proposals are prefixes


def cumulative_confidence(conf_logits_RK: torch.Tensor, temperatures_K: torch.Tensor | None = None) -> torch.Tensor:
    """a_RK = prod_{i<=k} sigmoid(logit_i / T_i) (T = 1 when not given); NaN logits give NaN."""
    return torch.cumprod(apply_sts(conf_logits_RK, temperatures_K), dim=1)


def apply_sts(conf_logits_RK: torch.Tensor, temperatures_K: torch.Tensor | None = None) -> torch.Tensor:
    """Calibrated per-position confidences c_RK = sigmoid(logit / T_k) (float64)."""
    logits = conf_logits_RK.detach().double()
    if temperatures_K is None:
        return torch.sigmoid(logits)
    if temperatures_K.numel() != logits.shape[1]:
        raise ValueError(
            f"apply_sts: {temperatures_K.numel()} temperatures for {logits.shape[1]} positions; fit_sts on the "
            "same gamma the confidences come from"
        )
    return torch.sigmoid(logits / temperatures_K.double().flatten()[None, :])


# ---------------------------------------------------------------- STS


def default_grid() -> torch.Tensor:
    """Temperatures 0.1..10, log-spaced (161 points, 1.0 included exactly)."""
    grid = torch.logspace(-1, 1, 161, dtype=torch.float64)
    grid[80] = 1.0
    return grid


def fit_sts(
    conf_logits_RK: torch.Tensor,
    outcome: torch.Tensor,
    grid: torch.Tensor | None = None,
    num_proposed_R: torch.Tensor | None = None,
    bins: int = DEFAULT_BINS,
) -> torch.Tensor:
    """Sequential temperature scaling: T_1, then T_2 given T_1, ... (returns float64 [K]).

    For position k, each candidate T in ``grid`` scores the ECE of
    prod_{i<k} sigmoid(l_i/T_i) * sigmoid(l_k/T) against survival [accepted_len >= k]
    over rounds where k was proposed; the smallest ECE wins (ties: T closest to 1).
    A position with no proposed rounds keeps T = 1.
    """
    R, K = conf_logits_RK.shape
    grid = (default_grid() if grid is None else grid.double().flatten())
    if grid.numel() == 0 or bool((grid <= 0).any()):
        raise ValueError("fit_sts: grid must hold positive temperatures")
    target_RK = survival_targets(outcome, K)
    mask_RK = proposed_mask(conf_logits_RK, num_proposed_R)
    logits_RK = conf_logits_RK.detach().double()
    tie_break = grid.log().abs() * 1e-12  # prefer T near 1 among (numerically) equal ECEs
    temperatures = torch.ones(K, dtype=torch.float64)
    prefix_R = torch.ones(R, dtype=torch.float64)
    for k in range(K):
        rows = mask_RK[:, k]
        if bool(rows.any()):
            prob_GN = prefix_R[rows][None, :] * torch.sigmoid(logits_RK[rows, k][None, :] / grid[:, None])
            errors = _ece_grid(prob_GN, target_RK[rows, k], bins)
            temperatures[k] = grid[torch.argmin(errors + tie_break)]
        prefix_R = prefix_R * torch.sigmoid(logits_RK[:, k] / temperatures[k])
    return temperatures


def calibration_report(
    conf_logits_RK: torch.Tensor,
    outcome: torch.Tensor,
    temperatures_K: torch.Tensor | None = None,
    num_proposed_R: torch.Tensor | None = None,
    bins: int = DEFAULT_BINS,
) -> dict:
    """ECE / AUC / Brier of prefix survival before (T=1) and after STS, per position and pooled.

    Fits STS on the same rounds when ``temperatures_K`` is None (pass temperatures fitted
    on other rounds for a held-out report).  Returns plain Python numbers:
    {"temperatures": [...], "bins": int, "per_position": [{"position", "rounds",
    "survival_rate", "ece_before", "ece_after", "auc_before", "auc_after",
    "brier_before", "brier_after"}, ...], "overall": {same keys except position}}.
    """
    K = conf_logits_RK.shape[1]
    if temperatures_K is None:
        temperatures_K = fit_sts(conf_logits_RK, outcome, num_proposed_R=num_proposed_R, bins=bins)
    target_RK = survival_targets(outcome, K)
    mask_RK = proposed_mask(conf_logits_RK, num_proposed_R)
    before_RK = cumulative_confidence(conf_logits_RK)
    after_RK = cumulative_confidence(conf_logits_RK, temperatures_K)

    def metrics(mask: torch.Tensor) -> dict:
        y, p0, p1 = target_RK[mask], before_RK[mask], after_RK[mask]
        return {
            "rounds": int(mask.sum()),
            "survival_rate": float(y.mean()) if y.numel() else math.nan,
            "ece_before": ece(p0, y, bins), "ece_after": ece(p1, y, bins),
            "auc_before": auc(p0, y), "auc_after": auc(p1, y),
            "brier_before": brier(p0, y), "brier_after": brier(p1, y),
        }

    per_position = []
    for k in range(K):
        column = torch.zeros_like(mask_RK)
        column[:, k] = mask_RK[:, k]
        per_position.append({"position": k + 1, **metrics(column)})
    return {
        "temperatures": [float(t) for t in temperatures_K],
        "bins": bins,
        "per_position": per_position,
        "overall": metrics(mask_RK),
    }


# ---------------------------------------------------------------- figures and sweeps


def reliability_diagram_png(
    path: str | Path,
    conf_logits_RK: torch.Tensor,
    outcome: torch.Tensor,
    temperatures_K: torch.Tensor,
    num_proposed_R: torch.Tensor | None = None,
    bins: int = DEFAULT_BINS,
    title: str = "Confidence calibration (prefix survival)",
) -> Path:
    """Write a PNG: pooled reliability curves before/after STS, and ECE per position."""
    from deepspec.runs import pyplot, save_figure

    plt = pyplot()
    report = calibration_report(conf_logits_RK, outcome, temperatures_K, num_proposed_R, bins)
    K = conf_logits_RK.shape[1]
    target_RK = survival_targets(outcome, K)
    mask_RK = proposed_mask(conf_logits_RK, num_proposed_R)
    fig, (ax_rel, ax_pos) = plt.subplots(1, 2, figsize=(11, 4.5))
    ax_rel.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect")
    for label, temps, marker in (("raw", None, "o"), ("STS", temperatures_K, "s")):
        prob, y = cumulative_confidence(conf_logits_RK, temps)[mask_RK], target_RK[mask_RK]
        bin_N = (prob * bins).long().clamp(0, bins - 1)
        count = torch.bincount(bin_N, minlength=bins).double()
        filled = count > 0
        mean_p = torch.bincount(bin_N, prob, minlength=bins)[filled] / count[filled]
        mean_y = torch.bincount(bin_N, y, minlength=bins)[filled] / count[filled]
        key = "ece_before" if temps is None else "ece_after"
        ax_rel.plot(mean_p, mean_y, marker=marker, label=f"{label} (ECE {report['overall'][key]:.3f})")
    ax_rel.set(xlabel="predicted prefix survival", ylabel="observed survival", xlim=(0, 1), ylim=(0, 1),
               title="reliability, all positions")
    ax_rel.legend()
    positions = [row["position"] for row in report["per_position"]]
    width = 0.4
    ax_pos.bar([p - width / 2 for p in positions], [row["ece_before"] for row in report["per_position"]],
               width, label="raw")
    ax_pos.bar([p + width / 2 for p in positions], [row["ece_after"] for row in report["per_position"]],
               width, label="STS")
    ax_pos.set(xlabel="draft position k", ylabel="ECE", title="ECE per position", xticks=positions)
    ax_pos.legend()
    fig.suptitle(title)
    return save_figure(fig, path)


def threshold_sweep(
    conf_logits_RK: torch.Tensor,
    accepted_len_R: torch.Tensor,
    thresholds: list[float] | torch.Tensor,
    temperatures_K: torch.Tensor | None = None,
    num_proposed_R: torch.Tensor | None = None,
    cumulative: bool = False,
) -> list[dict]:
    """Replay held-out rounds with confidence truncation at each threshold.

    A round verifies the longest prefix whose confidences are all >= threshold (the
    suffix from the first position below it is dropped), capped by what was proposed.
    Acceptance is left to right, so the truncated round accepts min(accepted_len, L)
    drafts and still commits one correction/bonus token.  ``cumulative`` thresholds
    a_k = prod c_i instead of c_k.  Returns, per threshold: {"threshold",
    "tokens_verified_per_round" (mean L), "acceptance_rate" (accepted / verified drafts,
    nan if none verified), "expected_tau" (mean accepted + 1)}.
    """
    R, K = conf_logits_RK.shape
    conf_RK = apply_sts(conf_logits_RK, temperatures_K)
    if cumulative:
        conf_RK = torch.cumprod(conf_RK, dim=1)
    proposed_RK = proposed_mask(conf_logits_RK, num_proposed_R)
    accepted = accepted_len_R.long()
    rows = []
    for threshold in [float(t) for t in thresholds]:
        keep_RK = (conf_RK >= threshold) & proposed_RK
        verified_R = torch.cumprod(keep_RK.long(), dim=1).sum(dim=1)
        accepted_R = torch.minimum(accepted, verified_R)
        n_verified = int(verified_R.sum())
        rows.append({
            "threshold": threshold,
            "tokens_verified_per_round": float(verified_R.double().mean()) if R else math.nan,
            "acceptance_rate": float(accepted_R.sum()) / n_verified if n_verified else math.nan,
            "expected_tau": float(accepted_R.double().mean() + 1) if R else math.nan,
        })
    return rows
