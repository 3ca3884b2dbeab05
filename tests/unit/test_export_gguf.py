"""format=gguf: what llama.cpp can load, and the GGUF its own converter makes of our HF layout.

The refusals need no llama.cpp. The conversion tests run the pinned llama.cpp's
`convert_hf_to_gguf.py` (skipped when its source is not in DEEPSPEC_LLAMACPP_DIR: run
`bash scripts/engine_check.sh --engine llamacpp ...` or one format=gguf export first) and read the
result with the `gguf` reader, so the layer ids, block size, mask token and slot convention are
checked against what llama.cpp writes and its runtime reads, not against our own table.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from deepspec.config import compose
from deepspec.drafters import DrafterSpec, build_drafter
from deepspec.export import llamacpp
from deepspec.export.checks import ExportCheckError
from deepspec.export.conventions import engine_problems
from deepspec.export.drafter import export_drafter

SMOLLM2 = "embedded:smollm2-135m-instruct"
K = 5


def have_converter() -> bool:
    try:
        llamacpp.source_dir(fetch=False)
        return importlib_has("sentencepiece") and importlib_has("gguf")
    except FileNotFoundError:
        return False


def importlib_has(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


needs_converter = pytest.mark.skipif(
    not have_converter(), reason="no llama.cpp source in DEEPSPEC_LLAMACPP_DIR, or no sentencepiece")


def chat_drafter(tiny_target, kind: str, layer_ids=(0, 2), **kw):
    """A random drafter for the tiny Llama with SmolLM2's vocabulary (4 layers, so layer 3 is the last)."""
    target = tiny_target("chat")
    block = kind != "eagle3"
    kw.setdefault("qk_norm", True if block else None)  # the configs' defaults
    spec = DrafterSpec(kind=kind, num_layers=2 if block else 1, block_size=K,
                       mask_token_id=4 if block else None,
                       head="markov" if kind == "dspark" else "none", markov_rank=8,
                       confidence_head=kind == "dspark", layer_ids=list(layer_ids),
                       draft_vocab_size=512 if kind == "eagle3" else None, **kw)
    torch.manual_seed(0)
    drafter = build_drafter(spec, target.shapes)
    drafter.attach_target(target.embed_tokens, target.lm_head_weight)
    return drafter


def test_block_drafters_default_to_qk_norm_for_the_engines():
    """configs/drafter/{dspark,dflash}.yaml build Qwen3-style layers whatever the target family."""
    for recipe in ("dspark_qwen3_4b", "dflash_qwen3_4b"):
        assert compose([f"recipe={recipe}"]).drafter.qk_norm is True
    assert compose(["recipe=eagle3_smollm2"]).drafter.qk_norm is None  # Eagle3 layers: none in every engine


def test_llamacpp_refuses_a_drafter_without_qk_norm_naming_the_setting(tiny_target, tmp_path):
    drafter = chat_drafter(tiny_target, "dspark", qk_norm=False)
    with pytest.raises(ExportCheckError, match=r"drafter\.qk_norm=false: llama\.cpp"):
        export_drafter(drafter, "llamacpp", tmp_path / "x", dtype="float32")
    assert not (tmp_path / "x" / "model.safetensors").exists()


def test_refusal_names_the_setting_for_every_engine_with_qwen3_draft_layers():
    for engine in ("vllm", "sglang", "llamacpp"):
        assert "drafter.qk_norm=false" in engine_problems(engine, "dflash", qk_norm=False)[0]
        assert engine_problems(engine, "dspark", qk_norm=True) == []
        assert "drafter.qk_norm=true" in engine_problems(engine, "eagle3", qk_norm=True)[0]
    assert engine_problems("hf", "dspark", qk_norm=False) == []  # deepspec's own layout loads anything


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    """SmolLM2's config + tokenizer as the converter reads them (written once: loading it takes a while)."""
    from deepspec.export.gguf import write_target_vocab

    return write_target_vocab(SMOLLM2, None, tmp_path_factory.mktemp("vocab") / "target_vocab")


def _convert(drafter, tmp_path, vocab):
    from deepspec.export.gguf import export_gguf

    return export_gguf(drafter, tmp_path / "g", SMOLLM2, dtype="float32", target_vocab=vocab)


@needs_converter
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dspark", "dflash"])
def test_converter_reads_every_block_convention_as_trained(tiny_target, tmp_path, vocab, kind):
    from deepspec.export.gguf import read_gguf_fields

    drafter = chat_drafter(tiny_target, kind, layer_ids=(2, 0))  # unsorted taps: the engine sorts them
    summary = _convert(drafter, tmp_path, vocab)
    arch, f = read_gguf_fields(tmp_path / "g" / "draft.gguf")
    assert arch == "dflash"
    assert f["dflash.block_size"] == K and f["tokenizer.ggml.mask_token_id"] == 4
    # llama.cpp feeds the drafter the *input* of each listed layer (llama_set_embeddings_layer_inp),
    # i.e. the output of the layer before: listed i <-> deepspec's "output of layer i - 1"
    assert [int(i) - 1 for i in f["dflash.target_layers"]] == [0, 2]
    assert f["dflash.sample_from_anchor"] is True
    assert f["dflash.has_confidence_head"] is (kind == "dspark")
    hf = json.loads((tmp_path / "g" / "config.json").read_text())
    assert hf["architectures"] == ["Qwen3DSparkModel"] and hf["markov_head_type"] == "vanilla"
    assert summary["format"] == "gguf" and summary["gguf_metadata"]["dflash.block_size"] == K


@needs_converter
@pytest.mark.slow
def test_a_missing_block_size_is_caught_after_conversion(tiny_target, tmp_path, vocab):
    """The converter silently writes block_size 16 when config.json lacks it: check_gguf names the key."""
    from deepspec.export.gguf import GGUFConventionError, check_gguf

    drafter = chat_drafter(tiny_target, "dspark")
    _convert(drafter, tmp_path, vocab)
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "g", bad)
    config = json.loads((bad / "config.json").read_text())
    del config["block_size"]
    (bad / "config.json").write_text(json.dumps(config))
    proc = llamacpp.run_converter(bad, vocab, bad / "draft.gguf", "f32")
    assert proc.returncode == 0, proc.stderr[-2000:]
    with pytest.raises(GGUFConventionError, match=r"dflash\.block_size=16, expected 5"):
        check_gguf(bad / "draft.gguf", drafter)


@needs_converter
@pytest.mark.slow
def test_converter_reads_eagle3_taps_as_trained(tiny_target, tmp_path, vocab):
    from deepspec.export.gguf import read_gguf_fields

    drafter = chat_drafter(tiny_target, "eagle3", layer_ids=(0, 1, 2))
    _convert(drafter, tmp_path, vocab)
    arch, f = read_gguf_fields(tmp_path / "g" / "draft.gguf")
    assert arch == "eagle3"
    assert [int(i) - 1 for i in f["eagle3.target_layers"]] == [0, 1, 2]  # input of layer i = output of i - 1


def test_a_build_made_with_other_cmake_flags_is_rebuilt(tmp_path, monkeypatch):
    """The build records its cmake flags; binaries from other flags (the AMX build that crashed on
    a Q4_1 model) do not count as a build, so the next engine check rebuilds."""
    monkeypatch.setenv("DEEPSPEC_LLAMACPP_DIR", str(tmp_path))
    bins = tmp_path / "build" / "bin"
    bins.mkdir(parents=True)
    for name in llamacpp.BINARIES:
        (bins / name).write_text("")
    assert not llamacpp.have_build()  # no record of its flags
    stamp = tmp_path / "build" / llamacpp.BUILD_STAMP
    stamp.write_text(json.dumps({"cmake_flags": ["-DGGML_NATIVE=ON"]}))
    assert not llamacpp.have_build()
    stamp.write_text(json.dumps({"cmake_flags": list(llamacpp.CMAKE_FLAGS)}))
    assert llamacpp.have_build()
    assert any("-mno-amx-int8" in f for f in llamacpp.CMAKE_FLAGS)
