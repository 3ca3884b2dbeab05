"""`deepspec eval` and `deepspec eval profile` on the embedded SmolLM2, the issue's contract commands.

The drafter is a trained checkpoint when DEEPSPEC_EVAL_DRAFT points at one, else an untrained
DSpark of the recipe saved to a temporary directory (τ near 1 then; losslessness and the
summary's shape are what this test protects either way).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from deepspec.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    given = os.environ.get("DEEPSPEC_EVAL_DRAFT")
    if given:
        return given
    from deepspec.config import compose, section
    from deepspec.drafters import build_drafter
    from deepspec.drafters.io import save_drafter
    from deepspec.targets import target_from_config

    cfg = compose(["recipe=dspark_smollm2"])
    target = target_from_config(cfg, need_tokenizer=False)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("untrained_dspark")
    save_drafter(out, build_drafter(section(cfg, "drafter"), target.shapes))
    return str(out)


def test_eval_contract_command(draft_dir, tmp_path):
    out = tmp_path / "E"
    rc = main(["eval", "recipe=dspark_smollm2", f"draft={draft_dir}", "eval.benchmarks=[gsm8k,mt-bench]",
               "eval.max_prompts=2", "eval.max_new_tokens=24", f"output_dir={out}"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    for name, prompts in (("gsm8k", 2), ("mt-bench", 4)):
        b = summary["benchmarks"][name]
        assert b["prompts"] == prompts
        assert b["greedy_match"] == 1.0, b["mismatches"]
        assert 1.0 <= b["tau"] <= 1 + b["block_size"] and b["speedup"] > 0
        # tau (accepted + 1 per round) agrees with the acceptance rate and the drafts verified per round
        assert b["tau"] == pytest.approx(1 + b["acceptance_rate"] * b["drafts_verified_per_round"])
        assert len(b["per_position_acceptance"]) == 7
    assert (out / "results.md").exists() and (out / "acceptance_by_position.png").exists()


def test_profile_contract_command(tmp_path):
    out = tmp_path / "S"
    rc = main(["eval", "profile", "recipe=dspark_smollm2", "eval.profile_batches=[1,2,4,8,16]",
               "eval.profile_context=256", "eval.profile_repeats=3", f"output_dir={out}"])
    assert rc == 0
    sps = json.loads((out / "sps.json").read_text())
    assert sps["batch_tokens"] == [1, 2, 4, 8, 16] and all(s > 0 for s in sps["steps_per_s"])
    assert (out / "load_simulation.png").exists()
