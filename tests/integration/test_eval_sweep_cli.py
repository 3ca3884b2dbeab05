"""`deepspec eval ... eval.batch_sizes=[1,4] eval.baselines=[CKPT2]`: the issue's contract command, on a
tiny random Llama with the SmolLM2 tokenizer (fast) and on the embedded SmolLM2 itself (slow)."""

from __future__ import annotations

import json

import pytest
import torch

from deepspec.cli import main

SWEEP_KEYS = {"batch_size", "speedup", "tau", "tok_s_per_request", "tok_s_total", "latency_p50_ms",
              "latency_p95_ms"}


def _drafters(cfg, shapes, out_dir):
    from deepspec.config import section
    from deepspec.drafters import build_drafter
    from deepspec.drafters.io import save_drafter

    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = out_dir / f"draft{seed}"
        save_drafter(path, build_drafter(section(cfg, "drafter"), shapes))
        paths.append(str(path))
    return paths


def _check_contract(out, draft2: str, benches: list[str], sizes: list[int]) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    for name in benches:
        b = summary["benchmarks"][name]
        assert [r["batch_size"] for r in b["sweep"]] == sizes
        for row in b["sweep"]:
            assert SWEEP_KEYS <= set(row)
            assert row["greedy_match"] == 1.0  # lossless at every concurrency
            assert row["latency_p50_ms"] <= row["latency_p95_ms"]
            assert row["tok_s_total"] >= row["tok_s_per_request"] * 0.999 or row["batch_size"] == 1
        assert summary["baselines"][draft2]["benchmarks"][name]["tau"] >= 1.0
    mem = summary["memory"]
    assert mem["target_only_mb"] > 0 and mem["with_drafter_mb"] > 0
    assert mem["drafter_param_mb"] > 0 and mem["drafter_kv_mb"] > 0
    assert (out / "speedup_vs_concurrency.png").stat().st_size > 1000
    assert "## Concurrency sweep" in (out / "results.md").read_text()
    return summary


def test_sweep_memory_and_baseline_on_a_tiny_target(tmp_path, monkeypatch):
    import deepspec.targets
    from deepspec.config import compose

    base = ["recipe=dspark_smollm2", "target=tiny_llama", "target.random_config.num_hidden_layers=4",
            "drafter.num_layers=1", "drafter.block_size=3", "drafter.markov_rank=16"]
    cfg = compose(base)
    target = deepspec.targets.target_from_config(cfg)
    monkeypatch.setattr(deepspec.targets, "target_from_config", lambda cfg, **_: target)
    draft, draft2 = _drafters(cfg, target.shapes, tmp_path)
    out = tmp_path / "D"
    rc = main(["eval", *base, f"draft={draft}", "eval.batch_sizes=[1,4]", "eval.max_prompts=4",
               f"eval.baselines=[{draft2}]", "eval.benchmarks=[gsm8k,mt-bench]", "eval.max_new_tokens=8",
               "eval.progress=false", f"output_dir={out}"])
    assert rc == 0
    summary = _check_contract(out, draft2, ["gsm8k", "mt-bench"], [1, 4])
    # one dtype for the whole sweep, recorded per row
    assert {r["target_dtype"] for r in summary["benchmarks"]["gsm8k"]["sweep"]} == {summary["target_dtype"]}
    assert summary["benchmarks"]["mt-bench"]["sweep"][1]["prompts"] == 8  # both turns of 4 conversations


def test_sampling_reports_the_distribution_check(tmp_path, monkeypatch):
    import deepspec.targets
    from deepspec.config import compose

    base = ["recipe=dspark_smollm2", "target=tiny_llama", "target.random_config.num_hidden_layers=4",
            "drafter.num_layers=1", "drafter.block_size=3", "drafter.markov_rank=16"]
    cfg = compose(base)
    target = deepspec.targets.target_from_config(cfg)
    monkeypatch.setattr(deepspec.targets, "target_from_config", lambda cfg, **_: target)
    draft, _ = _drafters(cfg, target.shapes, tmp_path)
    out = tmp_path / "S"
    rc = main(["eval", *base, f"draft={draft}", "eval.batch_sizes=[2]", "eval.max_prompts=4",
               "eval.temperature=1.0", "eval.benchmarks=[instruct]", "eval.max_new_tokens=16",
               "eval.progress=false", f"output_dir={out}"])
    assert rc == 0
    b = json.loads((out / "summary.json").read_text())["benchmarks"]["instruct"]
    assert b["greedy_match"] is None
    assert b["consistency"]["check"] == "distribution" and 0.0 <= b["consistency"]["p_value"] <= 1.0
    assert b["sweep"][0]["distribution_p_value"] == b["consistency"]["p_value"]


@pytest.mark.slow
def test_contract_command_on_smollm2(tmp_path):
    """The command exactly as the issue writes it (untrained drafters: τ near 1, the shape is the point)."""
    from deepspec.config import compose
    from deepspec.targets import target_from_config

    cfg = compose(["recipe=dspark_smollm2"])
    target = target_from_config(cfg, need_tokenizer=False)
    draft, draft2 = _drafters(cfg, target.shapes, tmp_path)
    out = tmp_path / "D"
    rc = main(["eval", "recipe=dspark_smollm2", f"draft={draft}", "eval.batch_sizes=[1,4]", "eval.max_prompts=4",
               f"eval.baselines=[{draft2}]", "eval.max_new_tokens=16", f"output_dir={out}"])
    assert rc == 0
    _check_contract(out, draft2, ["gsm8k", "humaneval", "mt-bench", "instruct"], [1, 4])


@pytest.mark.slow
def test_v4_report_has_an_mtp1_row(tmp_path):
    """`deepspec eval recipe=dspark_v4_tiny ... eval.baselines=[mtp]`: the tiny V4 target's own MTP module."""
    import data_tools  # noqa: F401  (the recipe's shipped chat data)
    from deepspec.config import compose
    from deepspec.targets import target_from_config

    cfg = compose(["recipe=dspark_v4_tiny"])
    shapes = target_from_config(cfg, need_tokenizer=False).shapes
    draft, _ = _drafters(cfg, shapes, tmp_path)
    out = tmp_path / "E"
    rc = main(["eval", "recipe=dspark_v4_tiny", f"draft={draft}", "eval.baselines=[mtp]", "eval.max_prompts=2",
               "eval.max_new_tokens=8", "eval.benchmarks=[gsm8k]", f"output_dir={out}"])
    assert rc == 0
    mtp = json.loads((out / "summary.json").read_text())["baselines"]["mtp"]
    assert mtp["kind"] == "mtp" and mtp["block_size"] == 1
    row = mtp["benchmarks"]["gsm8k"]["sweep"][0]
    assert row["greedy_match"] == 1.0 and 1.0 <= row["tau"] <= 2.0 and row["speedup"] > 0
    assert "MTP-1" in (out / "results.md").read_text()
