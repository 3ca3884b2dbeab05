"""The one atomic writer (deepspec.atomic) behind deepspec's run files and data_tools' outputs."""

from __future__ import annotations

import pytest

from deepspec.atomic import atomic_write_text, atomic_write_via
from deepspec.runs import atomic_write


def test_run_files_are_written_whole_with_their_folders(tmp_path):
    path = tmp_path / "new" / "summary.json"
    atomic_write(path, "{}\n")
    atomic_write(path, '{"a": 1}\n')
    assert path.read_text() == '{"a": 1}\n'
    assert [p.name for p in path.parent.iterdir()] == ["summary.json"]  # no temporary file left


def test_an_interrupted_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "state.json"
    atomic_write(path, "old\n")

    def broken(f):
        f.write("half of the new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_via(path, broken)
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_data_tools_write_through_the_same_function():
    from data_tools import jsonl

    assert jsonl.atomic_write_text is atomic_write_text
