"""Calibration metrics against hand-computed values; STS fixes an over-confident head;
the threshold sweep replays truncation exactly."""

from __future__ import annotations

import math

import pytest
import torch

from deepspec.decoding.calibration import (
    apply_sts,
    auc,
    brier,
    calibration_report,
    cumulative_confidence,
    ece,
    fit_sts,
    reliability_diagram_png,
    survival_targets,
    threshold_sweep,
)


def test_ece_hand_computed():
    p = torch.tensor([0.1, 0.4, 0.8, 0.9])
    y = torch.tensor([0.0, 1.0, 1.0, 1.0])
    # bin [0, .5): mean p .25, mean y .5 -> .25 * 2/4 ; bin [.5, 1]: .85 vs 1 -> .15 * 2/4
    assert ece(p, y, bins=2) == pytest.approx(0.2)
    assert ece(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0]), bins=10) == 0.0  # p = 1 lands in the top bin
    assert math.isnan(ece(torch.tensor([]), torch.tensor([])))


def test_brier_hand_computed():
    p = torch.tensor([0.1, 0.4, 0.8, 0.9])
    y = torch.tensor([0.0, 1.0, 1.0, 1.0])
    assert brier(p, y) == pytest.approx((0.01 + 0.36 + 0.04 + 0.01) / 4)


def test_auc_hand_computed_with_ties():
    assert auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)
    assert auc(torch.tensor([0.5, 0.5]), torch.tensor([1, 0])) == pytest.approx(0.5)
    # one tie across classes counts half: positives {0.3, 0.7}, negatives {0.3, 0.1} -> (0.5 + 1 + 1 + 1) / 4
    assert auc(torch.tensor([0.3, 0.7, 0.3, 0.1]), torch.tensor([1, 1, 0, 0])) == pytest.approx(0.875)
    assert math.isnan(auc(torch.tensor([0.2, 0.3]), torch.tensor([1, 1])))


def test_survival_targets_from_accepted_length():
    y = survival_targets(torch.tensor([0, 2, 3]), 3)
    assert y.tolist() == [[0, 0, 0], [1, 1, 0], [1, 1, 1]]
    with pytest.raises(ValueError, match="accepted_len_R"):
        survival_targets(torch.zeros(2, 4), 3)


def _overconfident_rounds(R=20_000, K=5, inflate=3.0, seed=0):
    """True per-position acceptance sigmoid(z); the head reports inflate * z (over-confident)."""
    g = torch.Generator().manual_seed(seed)
    z_RK = torch.randn(R, K, generator=g) * 1.2 + 1.0
    accepted_RK = torch.rand(R, K, generator=g) < torch.sigmoid(z_RK)
    accepted_len_R = torch.cumprod(accepted_RK.long(), dim=1).sum(1)
    return z_RK * inflate, accepted_len_R


def test_sts_reduces_ece_of_overconfident_head():
    logits, accepted_len = _overconfident_rounds()
    temperatures = fit_sts(logits, accepted_len)
    assert temperatures.shape == (5,)
    assert bool((temperatures > 2.0).all()) and bool((temperatures < 4.5).all()), temperatures
    report = calibration_report(logits, accepted_len, temperatures)
    overall = report["overall"]
    assert overall["ece_before"] > 0.05
    assert overall["ece_after"] < overall["ece_before"] / 3
    assert overall["brier_after"] < overall["brier_before"]
    for row in report["per_position"]:
        assert row["ece_after"] < row["ece_before"]
        assert 0.5 < row["auc_after"] <= 1.0
    # held-out rounds: temperatures fitted on one split calibrate another
    held_logits, held_len = _overconfident_rounds(seed=1)
    held = calibration_report(held_logits, held_len, temperatures)["overall"]
    assert held["ece_after"] < held["ece_before"] / 3


def test_sts_is_sequential_and_ignores_unproposed_positions():
    logits, accepted_len = _overconfident_rounds(R=4000, K=3)
    num_proposed = torch.randint(0, 4, (4000,), generator=torch.Generator().manual_seed(3))
    accepted_len = torch.minimum(accepted_len, num_proposed)
    temps = fit_sts(logits, accepted_len, num_proposed_R=num_proposed)
    # NaN logits in unproposed positions mean the same thing as num_proposed_R
    nan_logits = logits.clone()
    nan_logits[torch.arange(3)[None, :] >= num_proposed[:, None]] = float("nan")
    assert torch.equal(fit_sts(nan_logits, accepted_len), temps)
    # T_1 is fitted on position 1 alone; T_2 minimises ECE of sigmoid(l1/T_1) * sigmoid(l2/T)
    assert fit_sts(logits[:, :1], accepted_len.clamp_max(1), num_proposed_R=num_proposed)[0] == temps[0]
    grid = torch.linspace(0.5, 5.0, 19, dtype=torch.float64)
    temps = fit_sts(logits, accepted_len, grid=grid, num_proposed_R=num_proposed)
    rows = num_proposed >= 2
    first = torch.sigmoid(logits[rows, 0].double() / temps[0])
    errors = [ece(first * torch.sigmoid(logits[rows, 1].double() / t), accepted_len[rows] >= 2) for t in grid]
    assert temps[1] == grid[min(range(len(grid)), key=errors.__getitem__)]


def test_apply_sts_and_cumulative_confidence():
    logits = torch.tensor([[0.0, 2.0], [4.0, -2.0]])
    temps = torch.tensor([1.0, 2.0])
    c = apply_sts(logits, temps)
    assert c[0].tolist() == pytest.approx([0.5, torch.sigmoid(torch.tensor(1.0)).item()])
    a = cumulative_confidence(logits, temps)
    assert a[:, 1].tolist() == pytest.approx((c[:, 0] * c[:, 1]).tolist())
    with pytest.raises(ValueError, match="temperatures"):
        apply_sts(logits, torch.ones(3))


def test_threshold_sweep_hand_computed():
    conf = torch.tensor([[0.9, 0.8, 0.3], [0.6, 0.2, 0.9]])
    logits = torch.log(conf / (1 - conf))
    accepted_len = torch.tensor([2, 1])
    rows = threshold_sweep(logits, accepted_len, [0.0, 0.5, 0.95])
    assert rows[0] == pytest.approx(
        {"threshold": 0.0, "tokens_verified_per_round": 3.0, "acceptance_rate": 0.5, "expected_tau": 2.5})
    # 0.5: round 1 verifies 2 (0.3 dropped), round 2 verifies 1 (0.2 and the 0.9 after it dropped)
    assert rows[1] == pytest.approx(
        {"threshold": 0.5, "tokens_verified_per_round": 1.5, "acceptance_rate": 1.0, "expected_tau": 2.5})
    assert rows[2]["tokens_verified_per_round"] == 0.0 and rows[2]["expected_tau"] == 1.0
    assert math.isnan(rows[2]["acceptance_rate"])
    cumulative = threshold_sweep(logits, accepted_len, [0.5], cumulative=True)[0]
    assert cumulative["tokens_verified_per_round"] == pytest.approx(1.5)  # 0.9, 0.72 | 0.6, 0.12


def test_reliability_diagram_png(tmp_path):
    logits, accepted_len = _overconfident_rounds(R=2000, K=3)
    temps = fit_sts(logits, accepted_len)
    path = reliability_diagram_png(tmp_path / "plots" / "calibration.png", logits, accepted_len, temps)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
