"""`deepspec train` end to end through the CLI on a regenerate-style folder (online features).

Protects the contract command's shape: input=R (conversations), summary.json with steps,
final_loss, best_simulated_tau, tokens_per_s and a checkpoint that loads as a drafter; a
second invocation with resume=auto continues from it. The target is a tiny random Llama
with the embedded SmolLM2 tokenizer (chat template, loss masks), so nothing is downloaded.
"""

from __future__ import annotations

import json

import pytest

from deepspec.cli import main
from tests.tiny import cli_overrides

pytestmark = pytest.mark.slow


def _write_regenerated(folder, n_train=10, n_heldout=2):
    folder.mkdir()
    words = "the cat sat on a mat while two dogs ran past the old red barn near the river".split()
    rows = []
    for i in range(n_train + n_heldout):
        answer = " ".join(words[(i + j) % len(words)] for j in range(12 + i))
        rows.append({"index": i, "id": f"r{i}", "split": "train" if i < n_train else "heldout", "status": "success",
                     "messages": [{"role": "user", "content": f"Say something about item {i}."},
                                  {"role": "assistant", "content": answer}]})
    (folder / "regenerated.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _args(R, out, *extra):
    return ["train", "recipe=dspark_smollm2", f"input={R}", f"output_dir={out}",
            *cli_overrides("chat", name="tiny-llama", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=6, head_dim=8, max_position_embeddings=512),
            "drafter.num_layers=1", "drafter.markov_rank=8", "drafter.anchors_per_seq=8", "trainer.global_batch=4",
            "trainer.micro_batch=2", "trainer.eval_every=2", "trainer.save_every=2", "trainer.progress=false",
            *extra]


def test_train_cli_writes_the_contract_summary_and_resumes(tmp_path):
    R, out = tmp_path / "R", tmp_path / "T"
    _write_regenerated(R)
    assert main(_args(R, out, "trainer.max_steps=3")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3
    for key in ("final_loss", "best_simulated_tau", "initial_simulated_tau", "tokens_per_s"):
        assert isinstance(summary[key], float), key
    from deepspec.drafters.io import load_drafter

    assert load_drafter(summary["checkpoint"]).spec.kind == "dspark"
    assert (out / "config.yaml").exists() and (out / "loss_curve.png").exists()

    assert main(_args(R, out, "trainer.max_steps=5", "resume=auto")) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["steps"] == 5 and again["resumed_from"].endswith("final")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 3, 5]  # the first, every log_every (5) and the last
    assert all(r["grad_norm"] > 0 for r in rows if r["kind"] == "train")  # fp32 stage 0 too (DeepSpeed gives None)


def test_train_reads_a_features_cache_built_by_data_features(tmp_path):
    """`deepspec data features` output is a valid `input` for `deepspec train` (same target identity,
    tokenizer hash included), in cache mode and in the default online mode alike."""
    R, F = tmp_path / "R", tmp_path / "F"
    _write_regenerated(R)
    target = [a for a in _args(R, tmp_path / "x") if a.startswith(("target.", "+target."))]
    assert main(["data", "features", "recipe=dspark_smollm2", f"input={R}", f"output_dir={F}", *target]) == 0
    for mode in ("cache", "online"):
        out = tmp_path / f"T_{mode}"
        assert main(_args(F, out, "trainer.max_steps=1", f"features.source={mode}")) == 0
        assert json.loads((out / "summary.json").read_text())["steps"] == 1


def test_train_cli_explains_a_missing_input(tmp_path, capsys):
    assert main(["train", "recipe=dspark_smollm2", f"output_dir={tmp_path}", *cli_overrides("llama")]) == 1
    assert "input=PATH is required" in capsys.readouterr().err
