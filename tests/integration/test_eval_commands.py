"""`deepspec eval` / `eval calibrate` / `eval profile` through the CLI, end to end on a tiny random Llama
(SmolLM2 tokenizer) with an untrained DSpark drafter: summary, report, plots, STS stored with the
checkpoint, a run directory as draft=, and the SPS table the scheduler loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch


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
        assert 1.0 <= b["tau"] <= 1 + b["block_size"] and b["speedup"] > 0
        # tau (accepted + 1 per round) agrees with the acceptance rate and the drafts verified per round
        assert b["tau"] == pytest.approx(1 + b["acceptance_rate"] * b["drafts_verified_per_round"])
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
    common = [*base, f"draft={draft}", "eval.benchmarks=[gsm8k]", "eval.max_prompts=2",
              "eval.max_new_tokens=6",
              "eval.warmup=false", "eval.progress=false"]
    assert run_cli(["eval", "calibrate", *common, f"output_dir={tmp_path / 'C'}"]) == 0
    sts = json.loads((Path(draft) / "sts.json").read_text())
    assert len(sts["temperatures"]) == 3 and sts["block_size"] == 3
    assert run_cli(["eval", *common, "eval.confidence_threshold=0.3", f"output_dir={tmp_path / 'E2'}"]) == 0
    summary = json.loads((tmp_path / "E2" / "summary.json").read_text())
    assert summary["settings"]["sts"].endswith("sts.json")
    assert summary["benchmarks"]["gsm8k"]["greedy_match"] == 1.0


def test_eval_and_calibrate_take_a_run_directory_as_export_does(tiny_eval, tmp_path):
    base, draft = tiny_eval
    run_dir = tmp_path / "run"
    shutil.copytree(draft, run_dir / "checkpoints" / "final")
    common = [*base, f"draft={run_dir}", "eval.benchmarks=[gsm8k]", "eval.max_prompts=2",
              "eval.max_new_tokens=6", "eval.warmup=false", "eval.progress=false"]
    assert run_cli(["eval", "calibrate", *common, f"output_dir={tmp_path / 'C'}"]) == 0
    assert (run_dir / "checkpoints" / "final" / "sts.json").is_file()  # stored with the checkpoint it fits
    assert run_cli(["eval", *common, f"output_dir={tmp_path / 'E'}"]) == 0
    summary = json.loads((tmp_path / "E" / "summary.json").read_text())
    assert summary["settings"]["sts"] == str(run_dir / "checkpoints" / "final" / "sts.json")
    assert run_cli(["eval", *base, f"draft={tmp_path}", f"output_dir={tmp_path / 'X'}"]) == 1  # no checkpoint


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
