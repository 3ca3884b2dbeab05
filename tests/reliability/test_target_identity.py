"""A target is known by its weights, not its name (issue rows 8, 9): a feature cache, a
regeneration journal or a drafter recorded for the same name and shapes but other weights is
refused, naming both fingerprints; target.accept_changed_weights=true accepts it."""

from __future__ import annotations

import json

import pytest
import torch

from data_tools.features import open_feature_splits, write_feature_cache
from data_tools.hf_engine import HFEngine
from data_tools.regenerate import SamplingSettings, run_regeneration
from deepspec.drafters.io import save_drafter
from tests.tiny import SMOLLM2_TOKENIZER, tiny_target


def _target(seed: int):
    return tiny_target("chat", seed=seed, tokenizer=SMOLLM2_TOKENIZER, name="tiny")


@pytest.fixture(scope="module")
def targets():
    return _target(0), _target(1)  # same name and shapes, other weights


@pytest.fixture
def accept():
    from deepspec import guards

    yield guards.accept_changed_weights
    guards.accept_changed_weights(False)


def _conversations(path):
    path.mkdir()
    rows = [{"index": i, "id": f"r{i}", "split": "train", "status": "success",
             "messages": [{"role": "user", "content": f"question {i}"},
                          {"role": "assistant", "content": f"answer number {i} is here"}]} for i in range(3)]
    (path / "regenerated.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_fingerprint_follows_the_weights_not_the_name_or_dtype(targets):
    from deepspec import guards

    a, b = targets
    assert a.identity()["weights"] != b.identity()["weights"]
    assert a.identity()["weights"] == _target(0).identity()["weights"]
    bf16 = _target(0)
    bf16.model.to(torch.bfloat16)
    assert guards.weights_fingerprint(bf16.model) == a.identity()["weights"]  # one checkpoint, two dtypes


def test_a_feature_cache_of_other_weights_is_refused(targets, tmp_path, accept):
    a, b = targets
    write_feature_cache(_conversations(tmp_path / "R"), a, [1], tmp_path / "F", storage_dtype="fp32",
                        progress=False)
    with pytest.raises(ValueError, match=f"weights {a.identity()['weights']}.*{b.identity()['weights']}"):
        open_feature_splits(tmp_path / "F", b, [1], mode="cache")
    accept(True)
    train, _ = open_feature_splits(tmp_path / "F", b, [1], mode="cache")
    assert len(train) == 2


def test_a_regeneration_journal_of_other_weights_is_refused(targets, tmp_path, accept):
    a, b = targets
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": "p", "messages": [{"role": "user", "content": "hi"}]})
                                       + "\n")
    settings = SamplingSettings(max_new_tokens=2)
    run_regeneration(tmp_path / "in.jsonl", tmp_path / "o", HFEngine(a, settings), settings, progress=False,
                     provenance={"target_source": "random:llama"})
    with pytest.raises(ValueError, match="regeneration journal.*other weights"):
        run_regeneration(tmp_path / "in.jsonl", tmp_path / "o", HFEngine(b, settings), settings, progress=False)
    accept(True)
    summary = run_regeneration(tmp_path / "in.jsonl", tmp_path / "o", HFEngine(b, settings), settings,
                               progress=False)
    assert summary["resumed_rows"] == 1


def test_a_drafter_of_another_target_with_the_same_shapes_is_refused(targets, tmp_path, accept):
    from deepspec.drafters import build_drafter, resolve_spec
    from deepspec.drafters.io import check_target
    from deepspec.drafters.spec import DrafterSpec
    from deepspec.training.checkpoint import load_weights

    a, b = targets
    spec = resolve_spec(DrafterSpec(kind="dspark", num_layers=1, markov_rank=8, mask_token_id=49151), a.shapes)
    drafter = build_drafter(spec, a.shapes)
    save_drafter(tmp_path / "d", drafter, target={**a.identity(), "source": "random:llama"})
    with pytest.raises(ValueError, match="other weights"):
        check_target(tmp_path / "d", b.identity())
    with pytest.raises(ValueError, match="other weights"):
        load_weights(build_drafter(spec, b.shapes), tmp_path / "d", target=b.identity())
    check_target(tmp_path / "d", a.identity())
    accept(True)
    load_weights(build_drafter(spec, b.shapes), tmp_path / "d", target=b.identity())
