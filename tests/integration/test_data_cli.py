"""The data tools' CLI contract on the embedded SmolLM2 target (issue "Data tools").

Runs the exact commands of the contract through the `deepspec` console script and checks
their summary.json: prompts from the bundled (truncated) ShareGPT recover 17,671 rows;
8 rows regenerated with every row accounted for; features written and read back;
estimate prints bytes per token and total bytes. Slow: the regeneration of 8 ShareGPT
rows (multi-turn, long prompts) takes minutes on a 2-core CPU.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def deepspec(cwd: Path, *args: str) -> dict:
    exe = shutil.which("deepspec") or str(Path(sys.executable).with_name("deepspec"))
    proc = subprocess.run([exe, "data", *args], cwd=cwd, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = next(a.split("=", 1)[1] for a in args if a.startswith("output_dir=")) \
        if any(a.startswith("output_dir=") for a in args) else "runs/dspark_smollm2"
    return json.loads((cwd / out / "summary.json").read_text())


def test_data_contract_on_smollm2(tmp_path):
    full = deepspec(tmp_path, "prompts", "recipe=dspark_smollm2", "data.sources=[sharegpt]", "output_dir=P")
    assert full["rows_read"] == 17671
    assert full["rows_read"] == full["rows_kept"] + sum(full["dropped"].values())

    small = deepspec(tmp_path, "prompts", "recipe=dspark_smollm2", "data.max_rows=16", "output_dir=P16")
    assert small["rows_kept"] == 16

    regen = deepspec(tmp_path, "regenerate", "recipe=dspark_smollm2", "input=P16", "data.max_rows=8",
                     "regen.max_new_tokens=32", "output_dir=R")
    trainable = regen["success"] + regen["truncated"]
    assert regen["input_rows"] == trainable + regen["error"] + regen["skipped"] == 8
    assert trainable > 0 and regen["engine"]["engine"] == "hf"
    rows = [json.loads(x) for x in (tmp_path / "R" / "regenerated.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(8))
    assert all(r["meta"]["regen"]["max_new_tokens"] == 32 for r in rows)

    feats = deepspec(tmp_path, "features", "recipe=dspark_smollm2", "input=R", "output_dir=F")
    assert feats["sequences"] == trainable - feats["dropped"].get("no_loss_tokens", 0)
    assert feats["tokens"] > 0 and feats["loss_tokens"] > 0 and feats["bytes_per_token"] > 0

    from data_tools.cache import FeatureCache

    cache = FeatureCache(tmp_path / "F", verify="open")
    assert len(cache) == feats["sequences"]
    seq = cache[0]
    assert seq.taps_TMD.shape[1:] == (5, 576) and seq.final_TD.shape[1] == 576
    assert torch.isfinite(seq.taps_TMD).all() and seq.loss_mask_T.any()

    est = deepspec(tmp_path, "estimate", "recipe=dspark_smollm2", "features.dtype=fp8", "data.tokens=1000000")
    assert est["bytes_per_token"] == 5 + 576 * 5 + 2 * 576 + 5 * 4  # fp8 taps, bf16 final hidden state
    assert est["total_bytes"] == est["bytes_per_token"] * 1_000_000
    assert est["deepspec_bf16_bytes_per_token"] == 6 + 2 * 576 * 6
