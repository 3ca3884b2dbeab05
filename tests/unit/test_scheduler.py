"""Prefix scheduler (Algorithm 1): the early stop keeps verification decisions independent
of the drafted tokens they decide about; budgets are prefixes; load shrinks the budget."""

from __future__ import annotations

import pytest
import torch

from deepspec.decoding.scheduler import (
    SPSTable,
    admitted_mask,
    budget_from_stale,
    schedule_prefixes,
    simulate_load,
    topk_prefixes,
)


def _flat_then_step_sps(tokens: float) -> float:
    """SPS drops once past 1 token, then stays flat: verifying 2 drafts costs what 1 does."""
    return 10.0 if tokens <= 1 else 5.5


def _no_early_stop(conf_RK, sps):
    """The counterfactual: best cut point over the whole sorted list (no early stop)."""
    R, K = conf_RK.shape
    a = torch.cumprod(conf_RK.double(), 1).flatten()
    order = torch.sort(-a, stable=True).indices
    tau = R + torch.cumsum(a[order], 0)
    theta = [R * sps(R)] + [float(t) * sps(R + m + 1) for m, t in enumerate(tau.tolist())]
    m_best = max(range(len(theta)), key=theta.__getitem__)
    admitted = torch.zeros(R * K, dtype=torch.bool)
    admitted[order[:m_best]] = True
    return admitted.view(R, K).sum(1)


def test_early_stop_counterexample():
    # R=1, c1 = 0.6.  Admitting x1 alone: (1 + 0.6) * 5.5 = 8.8 < 10 -> stop, budget 0.
    # Without the stop, x1 gets verified iff x1 AND x2 beat 10: (1.6 + 0.6 c2) * 5.5 > 10,
    # i.e. iff c2 > 0.364 -- and c2 is computed from the drafted token x1 itself.
    low, high = torch.tensor([[0.6, 0.2]]), torch.tensor([[0.6, 0.9]])
    assert _no_early_stop(low, _flat_then_step_sps).tolist() == [0]
    assert _no_early_stop(high, _flat_then_step_sps).tolist() == [2]  # the flip
    assert schedule_prefixes(low, _flat_then_step_sps).tolist() == [0]
    assert schedule_prefixes(high, _flat_then_step_sps).tolist() == [0]


def _random_instance(seed):
    g = torch.Generator().manual_seed(seed)
    R, K = int(torch.randint(1, 12, (1,), generator=g)), int(torch.randint(1, 8, (1,), generator=g))
    conf = torch.rand(R, K, generator=g, dtype=torch.float64) ** 0.3
    if seed % 5 == 0:
        conf[torch.rand(R, K, generator=g) < 0.2] = 1.0  # ties between a_{r,j} and a_{r,j+1}
    latency, peak = float(torch.rand(1, generator=g)) * 0.05 + 0.001, float(torch.rand(1, generator=g)) * 2000 + 50
    return conf, SPSTable.synthetic(latency, peak, max_tokens=256)


@pytest.mark.parametrize("schedule", ["algorithm1", "topk"])
def test_decision_never_depends_on_later_positions_of_the_same_request(schedule):
    """Admitting (r, j) must not depend on c_{r,j+1..K} (those depend on the token x_{r,j})."""
    def budgets(conf, sps):
        if schedule == "algorithm1":
            return schedule_prefixes(conf, sps)
        return topk_prefixes(conf, 5)

    g = torch.Generator().manual_seed(123)
    checked = 0
    for seed in range(60):
        conf, sps = _random_instance(seed)
        R, K = conf.shape
        base = budgets(conf, sps)
        for r in range(R):
            for j in range(K):
                perturbed = conf.clone()
                perturbed[r, j + 1:] = torch.rand(K - j - 1, generator=g, dtype=torch.float64)
                admitted_before = bool(base[r] > j)
                assert bool(budgets(perturbed, sps)[r] > j) == admitted_before, (seed, r, j)
                checked += 1
    assert checked > 500


def test_budgets_are_contiguous_prefixes():
    for seed in range(60):
        conf, sps = _random_instance(seed)
        mask = admitted_mask(conf, sps)
        as_prefix = torch.arange(conf.shape[1])[None, :] < mask.sum(1)[:, None]
        assert torch.equal(mask, as_prefix), seed
        budget = topk_prefixes(conf, 7)
        assert int(budget.sum()) == min(7, conf.numel())


def test_algorithm1_admission_rule_by_hand():
    # SPS 100 at 2 tokens, 90 at 3, 80 at 4: candidates a = 0.9 (r0), 0.45 (r0 j2), 0.3 (r1)
    table = SPSTable((2, 3, 4, 5), (100.0, 90.0, 80.0, 40.0))
    conf = torch.tensor([[0.9, 0.5], [0.3, 0.1]])
    # start 2*100=200; +0.9 -> 2.9*90=261 keep; +0.45 -> 3.35*80=268 keep; +0.3 -> 3.65*40 stop
    assert schedule_prefixes(conf, table).tolist() == [2, 0]


def test_nan_marks_positions_not_drafted():
    conf = torch.tensor([[0.9, float("nan"), 0.9], [0.8, 0.8, 0.8]])
    mask = admitted_mask(conf, lambda tokens: 1.0)  # free tokens: admit every drafted position
    assert mask.tolist() == [[True, False, False], [True, True, True]]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        schedule_prefixes(torch.tensor([[1.5]]), lambda tokens: 1.0)


def test_stale_budget_searches_globally():
    # the flat SPS above: global search finds that 2 extra tokens pay, the greedy walk would stop
    conf = torch.tensor([[0.6, 0.9]])
    assert budget_from_stale(conf, _flat_then_step_sps) == 2
    assert topk_prefixes(torch.tensor([[0.95, 0.9], [0.99, 0.1]]), 3).tolist() == [2, 1]


def test_sps_table_interpolates_and_round_trips(tmp_path):
    table = SPSTable((1, 4, 8), (100.0, 70.0, 50.0), hardware="test")
    assert table(1) == 100.0 and table(0.5) == 100.0
    assert table(6) == pytest.approx(60.0)
    assert table(16) == pytest.approx(25.0)  # beyond the last point: tokens/s stays 400
    loaded = SPSTable.load_json(table.save_json(tmp_path / "sps.json"))
    assert loaded == table
    with pytest.raises(ValueError, match="increasing"):
        SPSTable((4, 2), (1.0, 1.0))


def test_budget_falls_as_load_grows():
    sps = SPSTable.synthetic(step_latency_s=0.02, peak_tokens_per_s=20_000, max_tokens=8192)
    levels = [1, 8, 32, 128, 512]
    rows = simulate_load(sps, levels, gamma=7, rounds=25, seed=0)
    budgets = [row["avg_budget"] for row in rows]
    assert budgets[0] > 6.0  # nearly free at low load: verify (almost) every draft
    assert all(b1 < b0 for b0, b1 in zip(budgets, budgets[1:], strict=False)), budgets
    assert budgets[-1] < 2.5
    throughput = [row["throughput_tokens_per_s"] for row in rows]
    assert all(t1 > t0 for t0, t1 in zip(throughput, throughput[1:], strict=False))
    # the scheduler is at least as good as both fixed policies at the two extremes
    fixed_full = simulate_load(sps, [1, 512], gamma=7, rounds=25, policy=7, seed=0)
    fixed_none = simulate_load(sps, [1, 512], gamma=7, rounds=25, policy=0, seed=0)
    assert rows[0]["throughput_tokens_per_s"] >= 0.99 * fixed_full[0]["throughput_tokens_per_s"]
    assert rows[-1]["throughput_tokens_per_s"] > fixed_full[1]["throughput_tokens_per_s"]
    assert rows[-1]["throughput_tokens_per_s"] > fixed_none[1]["throughput_tokens_per_s"]
    stale = simulate_load(sps, [1, 512], gamma=7, rounds=25, policy="stale_topk", seed=0)
    assert stale[0]["avg_budget"] > stale[1]["avg_budget"]
