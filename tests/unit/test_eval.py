"""Eval: metrics on hand-made rounds, benchmark loading, and `deepspec eval` / `eval calibrate` end to
end on a tiny random Llama (SmolLM2 tokenizer) with an untrained DSpark drafter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(scope="module")
def tiny_eval(tmp_path_factory, monkeypatch_module):
    """A tiny random Llama with the SmolLM2 tokenizer (loaded once) and an untrained DSpark checkpoint."""
    import deepspec.targets
    from deepspec.config import compose, section
    from deepspec.drafters import build_drafter
    from deepspec.drafters.io import save_drafter

    base = ["recipe=dspark_smollm2", "target=tiny_llama", "target.random_config.num_hidden_layers=4",
            "drafter.num_layers=1", "drafter.block_size=3", "drafter.markov_rank=16"]
    cfg = compose(base)
    target = deepspec.targets.target_from_config(cfg)
    monkeypatch_module.setattr(deepspec.targets, "target_from_config", lambda cfg, **_: target)
    torch.manual_seed(0)
    draft = tmp_path_factory.mktemp("draft")
    save_drafter(draft, build_drafter(section(cfg, "drafter"), target.shapes))
    return base, draft


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def run_cli(args: list[str]) -> int:
    from deepspec.cli import main

    return main(args)


def test_eval_writes_summary_report_plots_and_calibration(tiny_eval, tmp_path):
    base, draft = tiny_eval
    out = tmp_path / "E"
    rc = run_cli(["eval", *base, f"draft={draft}", "eval.benchmarks=[gsm8k,mt-bench]", "eval.max_prompts=2",
                  "eval.max_new_tokens=5", "eval.warmup=false", "eval.progress=false", f"output_dir={out}"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    for name, turns in (("gsm8k", 2), ("mt-bench", 4)):  # mt-bench: both turns of each conversation
        b = summary["benchmarks"][name]
        assert b["prompts"] == turns
        assert b["greedy_match"] == 1.0 and b["token_match_rate"] == 1.0
        assert b["tau"] >= 1.0 and b["speedup"] > 0
        assert len(b["per_position_acceptance"]) == 3
        assert b["spec_tokens_per_s"] > 0 and b["target_tokens_per_s"] > 0
        assert set(b["round_ms"]) == {"draft", "verify", "other"}
    cal = summary["calibration"]
    assert len(cal["temperatures"]) == 3 and len(cal["threshold_sweep"]) == 10
    for f in ("results.md", "acceptance_by_position.png", "tau_by_benchmark.png", "time_per_round.png",
              "calibration/reliability.png", "generations.jsonl"):
        assert (out / f).stat().st_size > 0, f
    assert "| gsm8k |" in (out / "results.md").read_text()


def test_calibrate_stores_sts_with_the_drafter_and_eval_uses_it(tiny_eval, tmp_path):
    base, draft = tiny_eval
    common = [*base, f"draft={draft}", "eval.benchmarks=[gsm8k]", "eval.max_prompts=2", "eval.max_new_tokens=6",
              "eval.warmup=false", "eval.progress=false"]
    assert run_cli(["eval", "calibrate", *common, f"output_dir={tmp_path / 'C'}"]) == 0
    sts = json.loads((Path(draft) / "sts.json").read_text())
    assert len(sts["temperatures"]) == 3 and sts["block_size"] == 3
    assert run_cli(["eval", *common, "eval.confidence_threshold=0.3", f"output_dir={tmp_path / 'E2'}"]) == 0
    summary = json.loads((tmp_path / "E2" / "summary.json").read_text())
    assert summary["settings"]["sts"].endswith("sts.json")
    assert summary["benchmarks"]["gsm8k"]["greedy_match"] == 1.0


def test_profile_writes_an_sps_table_the_scheduler_loads(tiny_eval, tmp_path):
    from deepspec.decoding.scheduler import SPSTable

    base, _ = tiny_eval
    out = tmp_path / "S"
    assert run_cli(["eval", "profile", *base, "eval.profile_batches=[1,4,8]", "eval.profile_context=32",
                    "eval.profile_repeats=2", "eval.concurrency=[1,8]", f"output_dir={out}"]) == 0
    table = SPSTable.load_json(out / "sps.json")
    assert table.batch_tokens == (1, 4, 8) and all(s > 0 for s in table.steps_per_s)
    summary = json.loads((out / "summary.json").read_text())
    assert [r["concurrency"] for r in summary["load_simulation"]["algorithm1"]] == [1, 8]
    assert all(r["avg_budget"] == 0 for r in summary["load_simulation"]["none"])
    assert (out / "load_simulation.png").stat().st_size > 0


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


def test_eval_auto_block_size_and_target_dtype_land_in_the_summary(tiny_eval, tmp_path, capsys):
    base, draft = tiny_eval
    out = tmp_path / "A"
    rc = run_cli(["eval", *base, f"draft={draft}", "eval.benchmarks=[gsm8k]", "eval.max_prompts=2",
                  "eval.max_new_tokens=5", "eval.warmup=false", "eval.progress=false", "eval.block_size=auto",
                  "eval.auto_prompts=1", f"output_dir={out}"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "eval.block_size=auto: acceptance by position" in printed and "<- chosen" in printed
    summary = json.loads((out / "summary.json").read_text())
    auto = summary["block_size_auto"]
    chosen = auto["chosen"]
    assert chosen == max(auto["cost_model"], key=lambda r: r["expected_speedup"])["gamma"]
    assert [r["gamma"] for r in auto["cost_model"]] == [1, 2, 3] and len(auto["acceptance"]) == 3
    gsm = summary["benchmarks"]["gsm8k"]
    assert gsm["block_size"] == chosen == summary["settings"]["block_size"]
    assert {"tau", "speedup", "greedy_match"} <= set(gsm) and gsm["greedy_match"] == 1.0
    # the tiny target shared by these tests is loaded once, in float32, and the summary says so
    assert summary["target_dtype"] == summary["settings"]["target_dtype"] == "float32"
    bad = ["eval", *base, f"draft={draft}", "eval.block_size=seven", f"output_dir={tmp_path / 'B'}"]
    assert run_cli(bad) != 0
    assert "eval.block_size='seven'; use a positive number of drafts per round" in capsys.readouterr().err


def test_eval_dtype_auto_picks_bf16_only_where_the_cpu_runs_it_fast():
    from deepspec.eval.dtype import resolve_eval_dtype

    for flags in ("fpu avx512f avx512_bf16", "fpu amx_bf16 amx_tile"):
        assert resolve_eval_dtype("auto", "float32", "cpu", cpuinfo=f"flags : {flags}")[0] == "bfloat16"
    dtype, why = resolve_eval_dtype("auto", "float32", "cpu", cpuinfo="flags : fpu avx2 avx512f")
    assert dtype == "float32" and "no AMX/AVX512-BF16" in why
    assert resolve_eval_dtype("target", "float16", "cpu")[0] == "float16"
    assert resolve_eval_dtype("bfloat16", "float32", "cpu")[0] == "bfloat16"
    with pytest.raises(ValueError, match="eval.target_dtype='fp8'"):
        resolve_eval_dtype("fp8", "float32", "cpu")


def test_eval_renders_prompts_with_thinking_off_by_default(capsys):
    """Qwen3-style templates read `enable_thinking`; eval must pass False unless eval.thinking=true."""
    from deepspec.eval.evaluate import encode_chat

    assert run_cli(["eval", "recipe=dspark_smollm2", "--cfg", "job"]) == 0
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
