"""Eval: metrics on hand-made rounds and benchmark loading (the commands end to end:
tests/integration/test_eval_commands.py)."""

from __future__ import annotations

import json

import pytest

from deepspec.decoding.engine import RoundLog
from deepspec.eval.benchmarks import load_benchmark, shipped_benchmarks
from deepspec.eval.metrics import match_metrics, per_position_acceptance, round_metrics


def test_per_position_acceptance_is_conditional_and_skips_untested_positions():
    # rounds: (proposed, accepted, eos_stop)
    rounds = [(3, 3, False), (3, 1, False), (3, 0, False), (2, 2, False), (3, 1, True)]
    n, a, e = zip(*rounds, strict=True)
    # k=1: all 5 reached, accepted in 4 -> 0.8
    # k=2: reached by rounds with a>=1: r0, r1, r3 (r4 stopped on an accepted EOS at 1) -> 2/3
    # k=3: reached by r0 (r3 proposed only 2) -> 1.0
    assert per_position_acceptance(n, a, e, 3) == pytest.approx([0.8, 2 / 3, 1.0])
    assert per_position_acceptance([1], [1], [False], 3)[1:] == [None, None]
    log = RoundLog(request=[0] * 5, proposed=list(n), accepted=list(a), committed=[4, 2, 1, 3, 1],
                   eos_stop=list(e))
    m = round_metrics(log, 3)
    assert m["tau"] == pytest.approx(1 + 7 / 5)
    assert m["acceptance_rate"] == pytest.approx(7 / 14)
    assert m["drafts_verified_per_round"] == pytest.approx(14 / 5)


def test_match_metrics_reports_the_first_divergence():
    m = match_metrics([[1, 2, 3], [4, 5, 9, 7]], [[1, 2, 3], [4, 5, 6, 7]])
    assert m["greedy_match"] == 0.5
    assert m["token_match_rate"] == pytest.approx(5 / 7)
    assert m["mismatches"] == [{"prompt": 1, "position": 2, "spec_token": 9, "target_token": 6}]


def test_benchmarks_shipped_and_by_path(tmp_path):
    assert {"gsm8k", "math500", "humaneval", "mbpp", "mt-bench", "aime24"} <= set(shipped_benchmarks())
    mt = load_benchmark("mt-bench", 3)
    assert len(mt.conversations) == 3 and all(len(c) == 2 for c in mt.conversations)
    own = tmp_path / "mine.jsonl"
    own.write_text(json.dumps({"turns": ["a", "b"]}) + "\n\n" + json.dumps({"turns": ["c"]}) + "\n")
    assert load_benchmark(str(own)).conversations == [["a", "b"], ["c"]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected a non-empty list of strings under 'turns'"):
        load_benchmark(str(bad))
    with pytest.raises(FileNotFoundError, match="neither a shipped benchmark"):
        load_benchmark("gsm9k")
