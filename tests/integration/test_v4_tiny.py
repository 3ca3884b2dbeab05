"""The tiny V4 recipe end to end through the CLI: train 3 steps (online features from a random
DeepSeek-V4 target) -> export to the V4 `mtp.*` layout -> re-import gives the trained drafter's exact
outputs; and the same recipe under 2-process ZeRO-3 (gloo) with the MoE blocks as leaf modules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
       "DS_ACCELERATOR": "cpu"}


def deepspec(*args: str, timeout: int = 900, cwd: Path = ROOT) -> None:
    proc = subprocess.run([sys.executable, "-m", "deepspec", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_tiny_v4_trains_exports_and_reimports(tmp_path):
    from deepspec.drafters.io import load_drafter
    from deepspec.drafters.packing import SequenceFeatures, pack_blocks
    from deepspec.export.v4 import import_v4

    run, vx = tmp_path / "v4", tmp_path / "vx"
    deepspec("train", "recipe=dspark_v4_tiny", "trainer.max_steps=3", f"output_dir={run}", cwd=tmp_path)  # any cwd
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["final_loss"] < 100
    deepspec("export", "recipe=dspark_v4_tiny", f"draft={run}", "format=v4", "export.dtype=float32",
             f"output_dir={vx}")
    trained = load_drafter(run / "checkpoints" / "final")
    back, notes = import_v4(vx)
    assert notes == [] and back.spec == trained.spec
    g = torch.Generator().manual_seed(0)
    V, D, m = trained.shapes.vocab_size, trained.shapes.hidden_size, len(trained.spec.layer_ids)
    emb, head = torch.randn(V, D, generator=g), torch.randn(V, D, generator=g)
    for d in (trained, back):
        d.attach_target(emb, head)
    T = 24
    seq = SequenceFeatures(torch.randint(0, 1000, (T,), generator=g), torch.ones(T, dtype=torch.bool),
                           torch.randn(T, m, D, generator=g), torch.randn(T, D, generator=g))
    batch = pack_blocks([seq], trained.spec.block_size, 6, trained.spec.mask_token_id, generator=g)
    a, b = trained(batch), back(batch)
    assert torch.equal(a.hidden_NKD, b.hidden_NKD) and torch.equal(a.conf_logit_NK, b.conf_logit_NK)
    assert torch.equal(a.lowrank_NKR @ a.lowrank_weight_RV, b.lowrank_NKR @ b.lowrank_weight_RV)


@pytest.mark.distributed
def test_tiny_v4_two_process_zero3(tmp_path):
    out = tmp_path / "z3"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "deepspec", "train", "recipe=dspark_v4_tiny",
           "deepspeed=zero3", "deepspeed.leaf_modules=[DeepseekV4SparseMoeBlock]", "trainer.max_steps=3",
           f"output_dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "checkpoints" / "final" / "drafter.safetensors").exists()
