"""The embedded SmolLM2 GGUF loads, renders its chat template and runs through the CLI."""

from __future__ import annotations

import json

import pytest

from deepspec.cli import main

pytestmark = pytest.mark.slow


def test_inspect_command_on_embedded_smollm2(tmp_path, capsys):
    assert main(["inspect", "recipe=dspark_smollm2", f"output_dir={tmp_path}"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["target"]["num_layers"] == 30 and summary["target"]["hidden_size"] == 576
    assert summary["target"]["vocab_size"] == 49152
    assert summary["taps_shape"][2:] == [5, 576] and summary["finite"]
    out = capsys.readouterr().out
    assert "<|im_start|>user" in out  # chat template rendered
    # a sensible greedy continuation of a chat answer, not garbage from a broken dequantisation
    assert summary["next_token"] not in (0, 1, 2)
