"""Run directories are never clobbered (issue rows 3, 4, 5, 10): `train` into a folder holding a
run, `export` into the checkpoint itself or over another export, and any command refused by its
checks leave every byte of the existing folder as it was."""

from __future__ import annotations

import json
import os

import pytest

from deepspec.cli import main
from tests.reliability.conftest import train_args, tree_digest

pytestmark = pytest.mark.slow


def test_train_into_an_existing_run_is_refused_and_touches_nothing(trained_run, tmp_path, capsys):
    R, T = trained_run
    before = tree_digest(T)
    assert main(train_args(R, T, "trainer.max_steps=1")) == 1
    err = capsys.readouterr().err
    assert "already holds a training run" in err and "resume=auto" in err and "overwrite=true" in err
    assert "Traceback" not in err
    assert tree_digest(T) == before  # checkpoints, metrics.jsonl, config.yaml: byte-identical


def test_a_command_refused_by_its_checks_keeps_the_runs_config(trained_run, capsys):
    R, T = trained_run
    before = tree_digest(T)
    # a resume target that does not exist: refused after the model loads, before anything is written
    assert main(train_args(R, T, "trainer.max_steps=3", f"resume={T / 'nope'}")) == 1
    assert "not a training checkpoint" in capsys.readouterr().err
    # the wrong stage's output as input
    assert main(train_args(T / "checkpoints", T, "trainer.max_steps=3", "resume=auto")) == 1
    assert tree_digest(T) == before


def test_overwrite_and_resume_contradict_and_overwrite_clears_the_old_run(run_copy):
    from deepspec.runs import check_train_output
    from deepspec.training.checkpoint import clear_run

    _, T = run_copy
    with pytest.raises(ValueError, match="contradict"):
        check_train_output(T, "auto", overwrite=True)
    check_train_output(T, "none", overwrite=True)  # allowed: the run is replaced when the new one starts
    (T / "notes.txt").write_text("mine")
    clear_run(T)
    assert not (T / "checkpoints").exists() and not (T / "metrics.jsonl").exists()
    assert (T / "notes.txt").exists()  # only what a training run writes is removed


def _export(draft, out, fmt="hf", *extra):
    return main(["export", "recipe=dspark_smollm2", f"draft={draft}", f"format={fmt}", f"output_dir={out}",
                 *extra])


def test_export_into_the_checkpoint_itself_is_refused(trained_run, capsys):
    _, T = trained_run
    ckpt = T / "checkpoints" / "final"
    before = tree_digest(T)
    assert _export(ckpt, ckpt) == 1
    assert "would overwrite the checkpoint" in capsys.readouterr().err
    assert _export(T, T) == 1  # the run folder holds the drafter too
    assert tree_digest(T) == before


def test_two_exports_never_mix_in_one_folder(trained_run, tmp_path, capsys):
    _, T = trained_run
    E = tmp_path / "E"
    assert _export(T, E, "hf") == 0
    first = tree_digest(E)
    assert _export(T, E, "vllm") == 1
    assert "is not empty" in capsys.readouterr().err
    assert tree_digest(E) == first
    assert _export(T, E, "vllm", "overwrite=true") == 0
    assert json.loads((E / "summary.json").read_text())["format"] == "vllm"
    assert not (E / "drafter.safetensors").exists()  # the hf export's files are gone, not mixed in
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("not an export")
    assert _export(T, other, "hf", "overwrite=true") == 1  # overwrite only replaces an earlier export
    assert (other / "keep.txt").read_text() == "not an export"


def test_an_export_that_failed_after_starting_can_be_rerun_with_overwrite(trained_run, tmp_path, monkeypatch):
    """A failed export leaves only its recorded config.yaml; overwrite=true replaces it (the rerun
    was refused as 'holds no earlier deepspec export' before)."""
    import deepspec.export.run as export_run

    _, T = trained_run
    E = tmp_path / "E"

    def broken(*args, **kwargs):
        raise RuntimeError("the engine's converter crashed")

    monkeypatch.setattr(export_run, "export_drafter", broken, raising=False)
    import deepspec.export.drafter as drafter_mod
    monkeypatch.setattr(drafter_mod, "export_drafter", broken)
    assert _export(T, E, "hf") == 1
    assert [p.name for p in E.iterdir() if not p.name.startswith(".")] == ["config.yaml"]
    monkeypatch.undo()
    assert _export(T, E, "hf") == 1  # still no silent overwrite without the flag
    assert _export(T, E, "hf", "overwrite=true") == 0
    assert json.loads((E / "summary.json").read_text())["format"] == "hf"


def test_output_dir_that_is_a_file_or_read_only_gets_a_message(trained_run, tmp_path, capsys):
    R, _ = trained_run
    f = tmp_path / "file"
    f.write_text("x")
    assert main(train_args(R, f, "trainer.max_steps=1")) == 1
    err = capsys.readouterr().err
    assert "is a file" in err and "Traceback" not in err
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        assert main(train_args(R, ro / "out", "trainer.max_steps=1")) == 1
        assert "cannot write" in capsys.readouterr().err


def test_clear_folder_keeps_the_lock(tmp_path):
    from deepspec.guards import LOCK_FILE, OutputLock
    from deepspec.runs import clear_folder

    (tmp_path / "a").mkdir()
    (tmp_path / "b.txt").write_text("x")
    with OutputLock(tmp_path):
        clear_folder(tmp_path)
        assert [p.name for p in tmp_path.iterdir()] == [LOCK_FILE]
    assert list(tmp_path.iterdir()) == []  # released: the folder is left as found
