"""Checkpoints that resume exactly, refuse the wrong run, and warm-start without optimizer state.

Protects: SIGKILL mid-run + resume=auto reproduces the uninterrupted loss curve bit for bit
(data order, anchors, optimizer and scheduler state, RNG); a checkpoint from a different
configuration is refused with the differing keys named; init_from copies weights only;
1x4 and 2x2 micro-batches give the same update (global-batch loss normalisation); the
final checkpoint is a loadable drafter (draft=PATH).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.integration.train_driver import ROOT, run_tiny, tiny_overrides, train_losses

pytestmark = pytest.mark.slow

DRIVER = Path(__file__).with_name("train_driver.py")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """An uninterrupted 6-step run (checkpoints at 3 and final)."""
    out = tmp_path_factory.mktemp("baseline")
    summary = run_tiny(tiny_overrides(output_dir=str(out)))
    return out, summary


def test_run_writes_summary_checkpoints_and_a_loadable_drafter(baseline):
    out, summary = baseline
    assert summary["steps"] == 6
    for key in ("final_loss", "best_simulated_tau", "initial_simulated_tau", "tokens_per_s", "wall_time_s"):
        assert summary[key] is not None and summary[key] == summary[key], key
    assert len(summary["per_position_acceptance"]) == 7
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "final"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_000003"]
    assert (ckpts / "best" / "best.json").exists()
    assert (out / "loss_curve.png").stat().st_size > 1000

    from deepspec.drafters.io import load_drafter

    drafter = load_drafter(summary["checkpoint"])
    state = json.loads((ckpts / "final" / "training_state.json").read_text())
    assert state["step"] == 6 and drafter.spec.kind == "dspark"
    assert {p.name for p in (ckpts / "final" / "rng").iterdir()} == {"rank_00000.pt"}


def test_sigkill_then_resume_reproduces_the_uninterrupted_losses(baseline, tmp_path):
    ref_out, _ = baseline
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # set in this process by the in-process runs; the child is its own world
    # 2 micro-batches per step: the 10th data request is the middle of step 5, after the step-3 checkpoint
    proc = subprocess.run([sys.executable, str(DRIVER), str(out), "--kill-after-batches", "9"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000003"
    assert not (out / "checkpoints" / "final").exists()
    assert max(train_losses(out)) == 4  # the killed run had logged step 4 before dying

    summary = run_tiny(tiny_overrides(output_dir=str(out), extra=["resume=auto"]))
    assert summary["resumed_from"].endswith("step_000003")
    ref, got = train_losses(ref_out), train_losses(out)
    assert sorted(got) == list(range(1, 7))
    assert got == ref, f"resumed losses differ:\n{got}\n{ref}"  # bit for bit


def test_resume_refuses_a_different_configuration(baseline, tmp_path):
    ref_out, _ = baseline
    with pytest.raises(ValueError) as err:
        run_tiny(tiny_overrides(output_dir=str(tmp_path), extra=[
            f"resume={ref_out / 'checkpoints' / 'step_000003'}", "drafter.markov_rank=8", "seed=3"]))
    msg = str(err.value)
    assert "differing keys" in msg and "drafter" in msg and "seed: 0 -> 3" in msg
    assert "markov_rank" not in msg or "16" in msg


def test_resume_none_and_auto_without_checkpoint_start_afresh(tmp_path, capsys):
    from deepspec.training.checkpoint import find_resume

    assert find_resume(tmp_path, "none") is None
    assert find_resume(tmp_path, "auto") is None
    with pytest.raises(FileNotFoundError, match="not a training checkpoint"):
        find_resume(tmp_path, str(tmp_path / "nowhere"))


def test_init_from_loads_weights_but_not_optimizer_state(baseline, tmp_path):
    ref_out, ref = baseline
    summary = run_tiny(tiny_overrides(output_dir=str(tmp_path), extra=[
        f"init_from={ref_out / 'checkpoints' / 'final'}", "trainer.max_steps=1", "trainer.lr=1e-9"]))
    # same held-out blocks, same weights: the warm start begins where the source run ended
    assert summary["initial_simulated_tau"] == pytest.approx(ref["final_simulated_tau"], abs=1e-6)
    assert summary["steps"] == 1 and summary["resumed_from"] is None
    engine_files = (tmp_path / "checkpoints" / "final" / "engine").glob("*.pt")
    steps = [s["step"] for f in engine_files for s in _adam_states(torch.load(f, weights_only=False))]
    assert steps and all(float(s) == 1 for s in steps), steps  # a fresh AdamW: one step, not 6 + 1


def _adam_states(obj):
    if isinstance(obj, dict):
        if "exp_avg" in obj and "step" in obj:
            yield obj
        for v in obj.values():
            yield from _adam_states(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _adam_states(v)


def test_grad_accumulation_matches_one_big_micro_batch(tmp_path):
    """global_batch 4 as 1 micro-batch of 4 or 2 of 2: the same update (anchors: all valid positions)."""
    common = ["trainer.global_batch=4", "trainer.max_steps=3", "trainer.save_every=0", "drafter.anchors_per_seq=64"]
    a = run_tiny(tiny_overrides(output_dir=str(tmp_path / "a"), extra=common + ["trainer.micro_batch=4"]))
    b = run_tiny(tiny_overrides(output_dir=str(tmp_path / "b"), extra=common + ["trainer.micro_batch=2"]))
    la, lb = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    for step in la:
        assert lb[step] == pytest.approx(la[step], rel=1e-5, abs=1e-6), (step, la, lb)
    from safetensors.torch import load_file

    wa = load_file(str(Path(a["checkpoint"]) / "drafter.safetensors"))
    wb = load_file(str(Path(b["checkpoint"]) / "drafter.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
