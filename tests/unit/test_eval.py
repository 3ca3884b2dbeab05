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
    assert m["tau"] == pytest.approx(11 / 5)  # committed tokens: r4's accepted EOS is not followed by a bonus
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


def test_auto_block_size_picks_the_gamma_that_maximises_the_printed_cost_model():
    from deepspec.eval.block_size import choose_block_size, expected_tau

    acceptance = [0.9, 0.8, 0.7, None, 0.5, 0.4, 0.3]  # an untested position counts as 0
    draft = {g: 0.1 + 0.02 * g for g in range(1, 8)}
    verify = {g: 1.0 + 0.15 * g for g in range(1, 8)}
    choice = choose_block_size(acceptance, draft, verify, source="synthetic")
    assert expected_tau(choice.acceptance, 3) == pytest.approx(1 + 0.9 + 0.72 + 0.504)
    assert expected_tau(choice.acceptance, 7) == expected_tau(choice.acceptance, 3)  # nothing past position 4
    printed = {}
    for line in choice.table().splitlines()[2:]:
        cols = line.split()
        printed[int(cols[0])] = float(cols[5])
    best = max(printed, key=printed.get)
    assert choice.block_size == best == 3
    assert "<- chosen" in next(line for line in choice.table().splitlines() if line.split()[:1] == ["3"])
    # costs that barely grow with gamma and high acceptance favour the whole block
    flat = choose_block_size([0.95] * 7, draft, {g: 1.0 + 0.01 * g for g in draft})
    assert flat.block_size == 7
    # a drafter that is never right: one draft per round is the cheapest loss
    assert choose_block_size([0.0] * 7, draft, verify).block_size == 1
    with pytest.raises(ValueError, match="acceptance covers 2 positions"):
        choose_block_size([0.5, 0.5], draft, verify)


def test_eval_dtype_auto_picks_bf16_only_where_the_cpu_runs_it_fast():
    from deepspec.eval.dtype import resolve_eval_dtype

    for flags in ("fpu avx512f avx512_bf16", "fpu amx_bf16 amx_tile"):
        assert resolve_eval_dtype("auto", "float32", "cpu", cpuinfo=f"flags : {flags}")[0] == "bfloat16"
    dtype, why = resolve_eval_dtype("auto", "float32", "cpu", cpuinfo="flags : fpu avx2 avx512f")
    assert dtype == "float32" and "no AMX/AVX512-BF16" in why
    # bf16 is bit-exact against target-only decoding only at batch 1 on a CPU
    dtype, why = resolve_eval_dtype("auto", "float32", "cpu", cpuinfo="flags : avx512_bf16", batch_size=4)
    assert dtype == "float32" and "batch size 4" in why
    assert resolve_eval_dtype("target", "float16", "cpu")[0] == "float16"
    assert resolve_eval_dtype("bfloat16", "float32", "cpu")[0] == "bfloat16"
    with pytest.raises(ValueError, match="eval.target_dtype='fp8'"):
        resolve_eval_dtype("fp8", "float32", "cpu")


def test_eval_renders_prompts_with_thinking_off_by_default(capsys):
    """Qwen3-style templates read `enable_thinking`; eval must pass False unless eval.thinking=true."""
    from deepspec.cli import main
    from deepspec.eval.evaluate import encode_chat

    assert main(["eval", "recipe=dspark_smollm2", "--cfg", "job"]) == 0
    job = capsys.readouterr().out
    assert "thinking: false" in job and "target_dtype: auto" in job

    class Target:
        def __init__(self):
            self.seen = []
            self.tokenizer = lambda text, add_special_tokens: {"input_ids": [len(text)]}

        def render_chat(self, messages, add_generation_prompt, enable_thinking=None):
            self.seen.append(enable_thinking)
            return "<think>" if enable_thinking is not False else "plain"

    target = Target()
    encode_chat(target, [{"role": "user", "content": "hi"}])
    encode_chat(target, [{"role": "user", "content": "hi"}], thinking=True)
    assert target.seen == [False, True]


def test_tau_of_a_round_ended_by_eos_counts_accepted_tokens_only():
    log = RoundLog(request=[0, 0], proposed=[3, 3], accepted=[1, 2], committed=[2, 2], eos_stop=[False, True])
    assert round_metrics(log, 3)["tau"] == 2.0  # (1 + 1) and (2 accepted, the EOS among them, no bonus)
