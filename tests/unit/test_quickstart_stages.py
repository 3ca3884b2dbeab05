"""Quickstart stage bookkeeping: reuse when finished with the same inputs, start afresh when they changed."""

from __future__ import annotations

from deepspec.quickstart import _run_stage


def test_a_stage_with_changed_inputs_starts_afresh(tmp_path):
    stage, calls = tmp_path / "train_dspark", []

    def func(cfg):
        calls.append(cfg.trainer.max_steps)
        assert not (stage / "features" / "stale").exists()  # nothing left from a run on other inputs
        (stage / "features").mkdir(parents=True, exist_ok=True)
        (stage / "features" / "stale").write_text("features of the earlier inputs")
        return {"steps": cfg.trainer.max_steps}

    first, _, _, reused = _run_stage("train", stage, ["trainer.max_steps=2"], ["up-a"], func, "quickstart_smollm2")
    assert (first["steps"], reused) == (2, False)
    again, _, _, reused = _run_stage("train", stage, ["trainer.max_steps=2"], ["up-a"], func, "quickstart_smollm2")
    assert (again["steps"], reused, calls) == (2, True, [2])
    changed, _, _, reused = _run_stage("train", stage, ["trainer.max_steps=2"], ["up-b"], func, "quickstart_smollm2")
    assert (changed["steps"], reused, calls) == (2, False, [2, 2])
