"""Tests for features.source=vllm (data_tools/vllm_features.py) against a stand-in vLLM server.

The stand-in speaks the part of vLLM's protocol deepspec uses (`/v1/models`; `/v1/completions`
with token ids, answering `kv_transfer_params.hidden_states_path`; a safetensors file with
`hidden_states` [T, ids, D], `token_ids` and `vllm_layer_ids`, behind `<file>.lock`) and follows
vLLM's aux-state numbering (id j = the residual stream after j decoder layers, pre final norm).
That numbering itself is checked against the real vLLM in tests/engine/test_vllm_features.py.

Protects: the layer-id translation (deepspec k -> vLLM k+1, the final state as id L, rows in
vLLM's sorted order whatever the taps' order); features through the server equal the resident
target's (fp32, 1e-5) final state included; `deepspec data features features.source=vllm` writes
a cache `deepspec train` opens (same identity as a transformers-built cache, refused for other
layers as today) and the same values as the transformers cache; online and hybrid sources read
through the server; a server extracting other layers, or unreachable, is refused with the fix named.
"""

from __future__ import annotations

import fcntl
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from data_tools.cache import FeatureCache
from data_tools.features import extract_features, open_feature_splits, write_feature_cache
from data_tools.tokenize import load_sequences
from data_tools.vllm_features import (
    VllmExtractor,
    feature_rows,
    final_state_source,
    read_hidden_states,
    resolve_final_state,
    server_command,
    vllm_layer_ids,
)
from tests.tiny import chat_target, cli_overrides, tiny_target
from tests.unit.test_features import write_regenerated

LAYERS = [2, 0]  # deliberately unsorted: vLLM's rows come back sorted


def test_layer_id_translation():
    assert vllm_layer_ids([1, 7, 14, 21, 27], 30) == [2, 8, 15, 22, 28, 30]
    assert vllm_layer_ids([2, 0, 2], 4) == [1, 3, 4]
    taps, final = feature_rows([2, 0], 4)
    assert taps == [1, 0] and final == 2  # rows of [1, 3, 4]: layer 2 -> id 3 (row 1), layer 0 -> id 1 (row 0)
    with pytest.raises(ValueError, match="outside the target's 4 decoder layers"):
        vllm_layer_ids([4], 4)
    # the model's own final state (deepspec's vLLM plugin): id L + 1, always the last row
    assert vllm_layer_ids([2, 0], 4, final="engine") == [1, 3, 5]
    assert feature_rows([2, 0], 4, final="engine") == ([1, 0], 2)
    assert vllm_layer_ids([3], 4, final="engine") == [4, 5]  # the last layer's output and the final state


def test_final_state_source_per_target():
    assert resolve_final_state("llama", "t", "mean") == "norm"  # stock vLLM + the target's norm
    assert resolve_final_state("llama", "t", "mean", "engine") == "engine"
    assert resolve_final_state("deepseek_v4", "t", "mean") == "engine"  # hc_head: only the model can give it
    with pytest.raises(ValueError, match="vllm_final_state=norm cannot give DeepSeek-V4"):
        resolve_final_state("deepseek_v4", "t", "mean", "norm")
    with pytest.raises(ValueError, match="stream_collapse=mean only"):
        resolve_final_state("deepseek_v4", "t", "first")
    with pytest.raises(ValueError, match="choose one of"):
        resolve_final_state("llama", "t", "mean", "pre-norm")


def test_deepseek_v4_features_through_server_equal_resident_target(tmp_path):
    """V4 through vLLM: taps = the mean of the 4 streams (target.stream_collapse=mean), final state = the
    model's own (hc_head + norm) from id L + 1; equal to the resident transformers V4's features."""
    v4 = tiny_target("deepseek_v4")
    assert v4.stream_collapse == "mean" and final_state_source(v4) == "engine"
    layers = [v4.num_layers - 1, 1]
    server = FakeVllm(v4, vllm_layer_ids(layers, v4.num_layers, "engine"), tmp_path / "hs")
    try:
        seqs = [_seq(v4, n) for n in (9, 14)]
        got = VllmExtractor([server.url], v4, layers)(seqs)
    finally:
        server.close()
    want = extract_features(v4, layers, seqs)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.taps_TMD, w.taps_TMD, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g.final_TD, w.final_TD, rtol=1e-5, atol=1e-5)


def test_engine_final_state_equals_norm_of_last_layer(target, tmp_path):
    """features.vllm_final_state=engine on an ordinary decoder: the same features as the stock path."""
    server = FakeVllm(target, vllm_layer_ids(LAYERS, target.num_layers, "engine"), tmp_path / "hs")
    try:
        seqs, _, _ = load_sequences(write_regenerated(tmp_path / "reg", 2), target.tokenizer, 256)
        got = VllmExtractor([server.url], target, LAYERS, final_state="engine")(seqs)
        with pytest.raises(ValueError, match=r"\(norm\) need \[1, 3, 4\]"):  # a server started for the other
            VllmExtractor([server.url], target, LAYERS)(seqs[:1])
    finally:
        server.close()
    for g, w in zip(got, extract_features(target, LAYERS, seqs), strict=True):
        torch.testing.assert_close(g.final_TD, w.final_TD, rtol=1e-5, atol=1e-5)


def _seq(target, n: int):
    from data_tools.tokenize import ChatSequence

    ids = torch.randint(3, 200, (n,), generator=torch.Generator().manual_seed(n))
    return ChatSequence(row_id=f"r{n}", split="train", input_ids=ids.tolist(), loss_mask=[i >= n // 2 for i in range(n)])


def test_server_command_names_the_wrapped_model_class(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["DeepseekV4ForCausalLM"]}))
    cmd = server_command("py", str(tmp_path), [2, 5], "/hs", 8000, final="engine")
    assert cmd[:3] == ["env", "DEEPSPEC_VLLM_FINAL_STATE=DeepseekV4ForCausalLM", "py"]
    assert "DEEPSPEC_VLLM_FINAL_STATE" not in " ".join(server_command("py", str(tmp_path), [2, 5], "/hs", 8000))
    with pytest.raises(ValueError, match="cannot be read"):  # the classes come from the model's config.json
        server_command("py", str(tmp_path / "none"), [2, 5], "/hs", 8000, final="engine")


class FakeVllm:
    """A thread serving vLLM's hidden-state protocol with a FrozenTarget's model (vLLM's numbering).

    ``max_tokens > 1`` generates greedily (``return_token_ids``; ``stop_after``: the answer's length
    before it emits the end-of-turn token, None = never); with ``kv_transfer_params.include_output_tokens``
    the file holds the prompt and every generated token but the last, as vLLM's connector writes it.
    ``usage.prompt_tokens_details.cached_tokens`` follows a prefix cache of whole ``block``-token blocks
    over everything sent or generated before (vLLM always computes a prompt's last token)."""

    def __init__(self, target, aux_ids: list[int], storage: Path, stop_after: int | None = None, block: int = 4):
        self.target, self.aux_ids, self.storage = target, sorted(aux_ids), storage
        self.stop_after, self.block = stop_after, block
        self.count = 0
        self.bodies: list[dict] = []
        self.seen: list[list[int]] = []
        self.lock = threading.Lock()  # one forward at a time: the hooks capture into one dict
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, obj):
                data = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send({"data": [{"id": "fake-model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                assert body["model"] == "fake-model"
                with fake.lock:
                    self._send(fake.complete(body))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @torch.no_grad()
    def complete(self, body: dict) -> dict:
        self.bodies.append(body)
        prompt = list(body["prompt"])
        gen: list[int] = []
        while len(gen) < body["max_tokens"]:
            if len(gen) == self.stop_after:
                gen.append(self.target.tokenizer.eos_token_id)
                break
            logits = self.target.model(input_ids=torch.tensor([prompt + gen])).logits
            gen.append(int(logits[0, -1].argmax()))
        tok = self.target.tokenizer
        finish = "stop" if tok is not None and gen[-1] == tok.eos_token_id else "length"
        cached = max((_common(prompt, s) for s in self.seen), default=0)
        cached = min(cached, len(prompt) - 1) // self.block * self.block
        self.seen.append(prompt + gen)
        output = (body.get("kv_transfer_params") or {}).get("include_output_tokens")
        path = self.write((prompt + gen)[:-1] if output else prompt)
        return {"choices": [{"text": tok.decode(gen, skip_special_tokens=True) if tok is not None else "",
                             "token_ids": gen if body.get("return_token_ids") else None, "finish_reason": finish}],
                "kv_transfer_params": {"hidden_states_path": path},
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(gen),
                          "prompt_tokens_details": {"cached_tokens": cached}}}

    @torch.no_grad()
    def write(self, ids: list[int]) -> str:
        model = self.target.model
        layers = model.get_decoder().layers
        states = {}
        hooks = [layer.register_forward_hook(lambda _m, _a, out, j=j: states.__setitem__(j + 1, out[0] if
                                                                                         isinstance(out, tuple) else out))
                 for j, layer in enumerate(layers)]
        try:
            out = model.get_decoder()(input_ids=torch.tensor([ids]))
        finally:
            for h in hooks:
                h.remove()
        # id L + 1: the model's own final state, as deepspec's vLLM plugin appends it
        states[len(layers) + 1] = out.last_hidden_state
        # DeepSeek-V4's layers return its 4 mHC streams [B, S, 4, D]: vLLM's aux state is their mean
        hidden = torch.stack([states[j][0] if states[j].dim() == 3 else states[j][0].mean(dim=1)
                              for j in self.aux_ids], dim=1)  # [T, ids, D]
        self.count += 1
        path = self.storage / f"req-{self.count}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(str(path) + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            save_file({"hidden_states": hidden.contiguous(), "token_ids": torch.tensor(ids)}, str(path),
                      metadata={"vllm_layer_ids": json.dumps(self.aux_ids)})
        return str(path)

    def close(self):
        self.server.shutdown()


def _common(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


@pytest.fixture(scope="module")
def target():
    return chat_target()


@pytest.fixture
def fake(target, tmp_path):
    server = FakeVllm(target, vllm_layer_ids(LAYERS, target.num_layers), tmp_path / "hs")
    yield server
    server.close()


def test_features_through_server_equal_resident_target(target, fake, tmp_path):
    seqs, _, _ = load_sequences(write_regenerated(tmp_path, 4), target.tokenizer, 128)
    ex = VllmExtractor([fake.url + "/v1"], target, LAYERS, concurrency=2)
    got, want = ex(seqs), extract_features(target, LAYERS, seqs)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.input_ids_T, w.input_ids_T) and torch.equal(g.loss_mask_T, w.loss_mask_T)
        torch.testing.assert_close(g.taps_TMD, w.taps_TMD, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g.final_TD, w.final_TD, atol=1e-5, rtol=1e-5)  # the final norm applied here
    assert ex.stats["requests"] == len(seqs) and ex.stats["prompt_tokens"] == sum(len(s.input_ids) for s in seqs)
    assert not list((tmp_path / "hs").glob("*.safetensors*"))  # files and locks removed once read


def test_cache_via_vllm_is_the_transformers_cache(target, fake, tmp_path):
    reg = write_regenerated(tmp_path / "reg", 5, heldout=(4,))
    ex = VllmExtractor([fake.url], target, LAYERS)
    s_v = write_feature_cache(reg, target, LAYERS, tmp_path / "v", storage_dtype="fp32", shard_tokens=200,
                              progress=False, extractor=ex, engine="vllm")
    s_h = write_feature_cache(reg, target, LAYERS, tmp_path / "h", storage_dtype="fp32", shard_tokens=200,
                              progress=False)
    assert s_v["engine"] == "vllm" and s_v["tokens"] == s_h["tokens"] and s_v["shards"] == s_h["shards"] > 1
    v, h = FeatureCache(tmp_path / "v"), FeatureCache(tmp_path / "h")
    assert v.identity == h.identity and v.manifest["engine"] == "vllm"
    for i in range(len(h)):
        torch.testing.assert_close(v[i].taps_TMD, h[i].taps_TMD, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v[i].final_TD, h[i].final_TD, atol=1e-5, rtol=1e-5)
    train, held = open_feature_splits(tmp_path / "v", target, LAYERS, mode="cache")  # what `deepspec train` opens
    assert len(train) == 4 and len(held) == 1
    with pytest.raises(ValueError, match="layers"):
        open_feature_splits(tmp_path / "v", target, [1], mode="cache")


def test_online_and_hybrid_sources_through_server(target, fake, tmp_path):
    reg = write_regenerated(tmp_path / "reg", 3)
    (online,) = open_feature_splits(reg, target, LAYERS, mode="vllm", splits=("all",), vllm_urls=[fake.url])
    want = open_feature_splits(reg, target, LAYERS, mode="online", splits=("all",))[0].get_batch([0, 2])
    for g, w in zip(online.get_batch([0, 2]), want, strict=True):
        torch.testing.assert_close(g.final_TD, w.final_TD, atol=1e-5, rtol=1e-5)
    assert fake.count == 2
    (hybrid,) = open_feature_splits(reg, target, LAYERS, mode="vllm", splits=("all",), vllm_urls=[fake.url],
                                    cache_dir=tmp_path / "hc", storage_dtype="fp32")
    hybrid.get_batch([0, 1, 2])  # covers every sequence: written as a shard
    assert fake.count == 5 and (tmp_path / "hc" / "manifest.json").exists()
    hybrid.get_batch([1])
    assert fake.count == 5  # read back from cache_dir, the server is not asked again


def test_server_with_other_layers_or_none_is_refused(target, tmp_path):
    other = FakeVllm(target, vllm_layer_ids([1], target.num_layers), tmp_path / "hs")
    try:
        seqs, _, _ = load_sequences(write_regenerated(tmp_path, 1), target.tokenizer, 128)
        with pytest.raises(ValueError, match=r"extracts vLLM layers \[2, 4\].*need \[1, 3, 4\].*vllm_features.sh"):
            VllmExtractor([other.url], target, LAYERS)(seqs)
    finally:
        other.close()
    with pytest.raises(ConnectionError, match="no vLLM server answers"):
        VllmExtractor(["http://127.0.0.1:9"], target, LAYERS)
    with pytest.raises(ValueError, match="features.vllm_urls"):
        VllmExtractor([], target, LAYERS)
    v4 = tiny_target("deepseek_v4")
    with pytest.raises(ValueError, match="hc_head"):  # before any server is contacted
        VllmExtractor(["http://127.0.0.1:9"], v4, [1], final_state="norm")


def test_read_waits_for_the_writer_lock(tmp_path):
    path = tmp_path / "r.safetensors"
    lock = open(str(path) + ".lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    result = {}
    reader = threading.Thread(target=lambda: result.update(zip(("h", "ids", "layers"), read_hidden_states(path), strict=True)))
    reader.start()
    reader.join(0.3)
    assert reader.is_alive()  # blocked on the lock: the file does not exist yet
    save_file({"hidden_states": torch.ones(3, 2, 4), "token_ids": torch.arange(3)}, str(path),
              metadata={"vllm_layer_ids": "[1, 2]"})
    lock.close()
    reader.join(10)
    assert result["layers"] == [1, 2] and result["h"].shape == (3, 2, 4) and not path.exists()


def test_cli_features_source_vllm(target, fake, tmp_path):
    from deepspec.cli import main

    reg = write_regenerated(tmp_path / "reg", 3)
    out = tmp_path / "F"
    rc = main(["data", "features", "recipe=dspark_smollm2", f"input={reg}", f"output_dir={out}",
               *cli_overrides("chat", name="tiny"), "drafter.layer_ids=[0,2]", "features.dtype=fp32",
               "features.source=vllm", f"features.vllm_urls=[{fake.url}]"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine"] == "vllm" and summary["vllm"]["requests"] == summary["sequences"] == 3
    (train,) = open_feature_splits(out, target, [0, 2], mode="cache", splits=("all",))
    assert len(train) == 3


def test_plan_feature_stage_hours():
    from transformers import LlamaConfig

    from deepspec.plan import feature_stage, target_active_params
    from tests.tiny import tiny_config

    total, active = target_active_params(LlamaConfig(**tiny_config("llama")))
    assert total == active > 0  # a dense target runs every parameter per token
    stated = feature_stage(total, active, tokens=3_600_000, nodes=2, gpus_per_node=8, mfu=0.35, source="vllm",
                           tokens_per_s=500.0)
    assert stated["wall_hours"] == 3_600_000 / (500.0 * 2) / 3600 and stated["gpu_hours"] == stated["wall_hours"] * 16
    estimated = feature_stage(total, active // 2, tokens=3_600_000, nodes=2, gpus_per_node=8, mfu=0.35,
                              source="vllm", tokens_per_s=None)
    assert estimated["throughput"] == "estimated" and estimated["tokens_per_s_per_server"] > 0
    # half the active parameters: twice the estimated rate
    again = feature_stage(total, active, tokens=3_600_000, nodes=2, gpus_per_node=8, mfu=0.35, source="vllm",
                          tokens_per_s=None)
    assert abs(estimated["tokens_per_s_per_server"] / again["tokens_per_s_per_server"] - 2) < 1e-3
