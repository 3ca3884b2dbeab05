"""Fixtures of the reliability suite: one small training run shared by the tests that need a run
directory or a checkpoint (a tiny random Llama with the embedded SmolLM2 tokenizer, 2 steps)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from tests.integration.test_train_cli import _args, _write_regenerated


def train_args(R, out, *extra) -> list[str]:
    """`deepspec train` argv on the tiny target (see tests/integration/test_train_cli.py)."""
    return _args(R, out, "trainer.eval_sequences=2", "drafter.layer_ids=[1,2,4]", *extra)  # distinct: servable


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (relative path -> digest): 'byte-identical' made testable."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """(regenerate folder R, run folder T) after `deepspec train ... trainer.max_steps=2`."""
    from deepspec.cli import main

    root = tmp_path_factory.mktemp("trained")
    R, T = root / "R", root / "T"
    _write_regenerated(R)
    assert main(train_args(R, T, "trainer.max_steps=2", "trainer.save_every=1", "trainer.keep_last=5")) == 0
    return R, T


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """A private copy of the trained run (tests that try to damage it)."""
    R, T = trained_run
    copy = tmp_path / "T"
    shutil.copytree(T, copy)
    return R, copy
