"""Bad input is refused or counted with a message naming the file and what to do, never silent and
never a raw traceback (issue rows 9, 10, 11)."""

from __future__ import annotations

import errno
import json

import pytest

from data_tools.cache import FORMAT, MANIFEST, FeatureCache
from data_tools.regenerate import SamplingSettings, run_regeneration
from deepspec.cli import main
from tests.reliability.test_regeneration import _OneFails
from tests.tiny import cli_overrides

TINY_TARGET = cli_overrides("chat", name="tiny-llama", hidden_size=32, intermediate_size=64, head_dim=8)


def _prompts_folder(path):
    path.mkdir()
    (path / "train.jsonl").write_text(json.dumps({"id": "a", "messages": [{"role": "user", "content": "hi"}]})
                                      + "\n")
    (path / "heldout.jsonl").write_text("")
    return path


@pytest.mark.parametrize("command", [["train"], ["data", "features"]])
def test_a_prompts_folder_is_refused_as_training_or_feature_input(tmp_path, capsys, command):
    P = _prompts_folder(tmp_path / "P")
    assert main([*command, "recipe=dspark_smollm2", f"input={P}", f"output_dir={tmp_path / 'o'}"]) == 1
    err = capsys.readouterr().err
    assert "`deepspec data prompts` folder" in err and "deepspec data regenerate" in err
    assert not (tmp_path / "o" / "config.yaml").exists()


def test_a_regenerate_output_is_refused_as_regenerate_input(tmp_path, capsys):
    R = tmp_path / "R"
    R.mkdir()
    (R / "regenerated.jsonl").write_text("{}\n")
    assert main(["data", "regenerate", "recipe=dspark_smollm2", f"input={R}", f"output_dir={tmp_path / 'o'}",
                 "regen.engine=openai", "regen.urls=[http://127.0.0.1:9]"]) == 1
    assert "is a regenerate output, not prompts" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"", b"\x00\xff\xfe" * 500, b"not json\n{}\n[1]\n"])
def test_empty_binary_or_all_invalid_prompt_files_are_refused(tmp_path, capsys, content):
    f = tmp_path / "in.jsonl"
    f.write_bytes(content)
    assert main(["data", "prompts", "recipe=dspark_smollm2", f"data.sources=[{f}]",
                 f"output_dir={tmp_path / 'p'}"]) == 1
    assert "no usable prompt" in capsys.readouterr().err
    if content:  # an empty file is refused before anything reads it
        with pytest.raises(ValueError, match="none of its .* rows can be regenerated"):
            run_regeneration(f, tmp_path / "o", _OneFails(), SamplingSettings(), progress=False)
    else:
        assert main(["data", "regenerate", "recipe=dspark_smollm2", f"input={f}", f"output_dir={tmp_path / 'o'}",
                     "regen.engine=openai", "regen.urls=[http://127.0.0.1:9]"]) == 1
        assert "empty file" in capsys.readouterr().err


def test_undecodable_bytes_are_counted_not_replaced(tmp_path):
    f = tmp_path / "in.jsonl"
    good = [json.dumps({"id": f"p{i}", "messages": [{"role": "user", "content": f"hi {i}"}]}).encode()
            for i in range(3)]
    bad = b'{"id": "x", "messages": [{"role": "user", "content": "caf\xe9"}]}'  # latin-1, not UTF-8
    f.write_bytes(b"\n".join([good[0], bad, good[1], good[2]]) + b"\n")
    summary = run_regeneration(f, tmp_path / "o", _OneFails(), SamplingSettings(), progress=False,
                               max_error_fraction=0.5)
    assert summary["skipped_by_reason"] == {"not_utf8": 1}


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "shards/../../x.safetensors"])
def test_manifest_shard_paths_stay_inside_the_cache(tmp_path, shard):
    cache = tmp_path / "cache"
    cache.mkdir()
    (tmp_path / "outside.safetensors").write_bytes(b"secret")
    manifest = {"format": FORMAT, "complete": True, "identity": {"storage_dtype": "fp32"}, "fingerprint": {},
                "shards": [{"file": shard, "sha256": "0" * 64, "bytes": 6, "seq_index": [0], "num_tokens": [3],
                            "loss_tokens": 1, "split": ["train"]}]}
    (cache / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="outside the cache folder"):
        FeatureCache(cache)


def test_disk_full_is_a_message_naming_the_file(tmp_path, capsys, monkeypatch):
    import data_tools.features as features

    R = tmp_path / "R"
    R.mkdir()
    (R / "regenerated.jsonl").write_text(json.dumps(
        {"index": 0, "id": "r", "split": "train", "status": "success",
         "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a b c"}]}) + "\n")

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(features, "write_shard", full)
    assert main(["data", "features", "recipe=dspark_smollm2", f"input={R}", f"output_dir={tmp_path / 'F'}",
                 "drafter.layer_ids=[1]", *TINY_TARGET]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "shard-00000" in err and "larger disk" in err
    assert "Traceback" not in err


def test_training_input_without_a_trainable_row_says_why(tmp_path, capsys):
    """A regenerate output whose rows all carry another status (here "ok") gives an error naming the
    input and what a trainable row needs, not a held-out sizing error from deeper in the trainer."""
    R = tmp_path / "R"
    R.mkdir()
    (R / "regenerated.jsonl").write_text(json.dumps(
        {"index": 0, "id": "r", "split": "train", "status": "ok",
         "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a b c"}]}) + "\n")
    assert main(["train", "recipe=dspark_smollm2", f"input={R}", f"output_dir={tmp_path / 'o'}",
                 "drafter.layer_ids=[1]", "trainer.max_steps=1", *TINY_TARGET]) == 1
    err = capsys.readouterr().err
    assert f"input={R}: no trainable training sequence" in err and "status success or truncated" in err
    assert "Traceback" not in err
