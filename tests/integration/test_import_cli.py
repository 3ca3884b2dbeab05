"""The issue's second contract, through the CLI: `deepspec import <tiny V4 dir, mtp.* in FP8 with scales>
output_dir=C`, then `deepspec train recipe=dspark_v4_tiny init_from=C trainer.max_steps=1`, and
`deepspec export draft=C format=v4` writes the same (dequantised) tensors back."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from deepspec.cli import main
from tests.unit.test_importers import write_v4_checkpoint

pytestmark = pytest.mark.slow


def test_import_train_from_it_and_export_back(tmp_path):
    from deepspec.config import compose, section
    from deepspec.drafters import build_drafter
    from deepspec.export.v4 import read_mtp_tensors
    from deepspec.targets import target_from_config

    cfg = compose(["recipe=dspark_v4_tiny"])
    shapes = target_from_config(cfg, need_tokenizer=False).shapes
    torch.manual_seed(0)
    released = build_drafter(section(cfg, "drafter"), shapes)
    src = write_v4_checkpoint(released, tmp_path / "V4")
    C, run, X = tmp_path / "C", tmp_path / "run", tmp_path / "X"

    assert main(["import", str(src), f"output_dir={C}"]) == 0
    summary = json.loads((C / "summary.json").read_text())
    assert summary["layout"] == "v4" and "DeepSeek-V4 DSpark" in summary["variant"]

    assert main(["train", "recipe=dspark_v4_tiny", f"init_from={C}", "trainer.max_steps=1",
                 f"output_dir={run}"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 1

    assert main(["export", f"draft={C}", "format=v4", f"output_dir={X}"]) == 0
    want, got = read_mtp_tensors(src), load_file(str(X / "mtp.safetensors"))
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def test_import_refuses_a_non_empty_output_and_a_missing_source(tmp_path):
    (tmp_path / "C").mkdir()
    (tmp_path / "C" / "x.txt").write_text("x")
    assert main(["import", str(tmp_path / "nowhere"), f"output_dir={tmp_path / 'D'}"]) == 1
    assert main(["import", str(tmp_path), f"output_dir={tmp_path / 'C'}"]) == 1
