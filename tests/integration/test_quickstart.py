"""A reduced quickstart runs the whole pipeline end to end on the real SmolLM2, and a re-run reuses it."""

from __future__ import annotations

import json

import pytest

from deepspec.cli import main

pytestmark = pytest.mark.slow

SMALL = ["quickstart.prompts=12", "quickstart.max_new_tokens=16", "quickstart.train_steps=2",
         "quickstart.eval_prompts=1", "quickstart.eval_max_new_tokens=16", "quickstart.regen_batch_size=12"]


def test_reduced_quickstart_end_to_end(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", *SMALL, f"output_dir={out}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for name in ("gsm8k", "mt-bench"):
        b = summary["benchmarks"][name]
        ev = json.loads((out / "eval_dspark" / "summary.json").read_text())["benchmarks"][name]
        assert b["tau"] == ev["tau"] and b["speedup"] == ev["speedup"] > 0  # the eval stage's figures
        assert 1.0 <= ev["tau"] <= 1 + ev["block_size"]
        # tau (accepted + 1 per round) agrees with the acceptance rate and the drafts verified per round
        assert ev["tau"] == pytest.approx(1 + ev["acceptance_rate"] * ev["drafts_verified_per_round"])
        assert b["greedy_match"] == 1.0  # greedy speculative decoding is lossless
    for stage in ("prompts", "regenerate", "train_dspark", "eval_dspark"):
        assert stage in summary["stage_seconds"] and stage not in summary["reused_stages"]  # it ran
        assert (out / stage / "summary.json").exists()
    assert (out / "train_dspark" / "features" / "manifest.json").exists()  # hybrid features were cached
    assert "deepspec quickstart" in capsys.readouterr().out

    # a second run with the same settings reuses every finished stage
    assert main(["quickstart", *SMALL, f"output_dir={out}"]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert set(again["reused_stages"]) >= {"prompts", "regenerate", "train_dspark", "eval_dspark"}
