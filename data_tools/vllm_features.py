"""Target features from vLLM's hidden-state extraction (`features.source=vllm`).

A vLLM server started with the `extract_hidden_states` speculative method and deepspec's connector
(`data_tools/vllm_plugin/deepspec_vllm_connector.py`) runs the prefill of any token ids it is sent
and writes the hidden states of the requested layers for every prompt token to a file on storage
this process shares; the response names the file. `VllmExtractor` sends each training sequence's
token ids (`/v1/completions`, `max_tokens=1`), reads the files back and returns the same
`SequenceFeatures` that `data_tools.features.extract_features` computes with `transformers`, so
the feature cache, the online and the hybrid sources use either one unchanged.

Layer ids (`vllm_layer_ids`, the only place they are translated): deepspec's "layer k" is the
output of decoder layer k (`transformers`' `hidden_states[k+1]`). vLLM's aux id j is the residual
stream after j decoder layers (`hidden_states + residual` before layer j runs, the embeddings for
j = 0), so deepspec k is vLLM k + 1. vLLM sorts and de-duplicates the ids, and the rows of its file
follow that order. The final hidden state (post final norm, where p_t comes from) is not an aux
state; it comes one of two ways (`final_state_source`, setting `features.vllm_final_state`):

- `norm` (stock vLLM, every decoder with a final `norm`): vLLM id L (after the last of L layers,
  before the final norm) is extracted and the target's own final norm is applied here;
- `engine`: deepspec's vLLM plugin (`vllm_plugin/deepspec_vllm_final_state.py`) makes the model
  return its own final state as id L + 1. DeepSeek-V4 needs it: its aux states are the mean of its
  4 mHC streams, while its final state mixes them through `hc_head` before the norm, which no
  function of the mean can reproduce. `auto` picks `engine` for V4 and `norm` elsewhere.

The resident target (its norm and its tokenizer) is still loaded by the process that reads the
features.

Servers: `server_command` builds the command (`launch/vllm_features.sh` runs it on a node);
`local_server` starts one from the separate vLLM environment ($DEEPSPEC_VLLM_VENV) when no
`features.vllm_urls` are given. vLLM pins its own torch and transformers, so it never shares
deepspec's environment: the two talk over HTTP and the shared folder only.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open

from data_tools.tokenize import ChatSequence
from deepspec.features import SequenceFeatures

PLUGIN_DIR = Path(__file__).resolve().parent / "vllm_plugin"
CONNECTOR_MODULE = "deepspec_vllm_connector"
CONNECTOR_CLASS = "DeepspecHiddenStatesConnector"
FINAL_STATE_ENV = "DEEPSPEC_VLLM_FINAL_STATE"  # read by vllm_plugin/deepspec_vllm_final_state.py
FINAL_STATE_SOURCES = ("auto", "norm", "engine")


def final_state_source(target, setting: str = "auto") -> str:
    """Where the final hidden state of ``target`` comes from through vLLM: "norm" (vLLM id L + the
    target's final norm, applied here) or "engine" (the model's own, id L + 1, from deepspec's plugin);
    ``setting`` is features.vllm_final_state. Raises for what vLLM cannot give (with "norm": a target
    without a final norm)."""
    final = resolve_final_state(target.shapes.model_type, target.name, target.stream_collapse, setting)
    if final == "norm":
        final_norm(target)
    return final


def resolve_final_state(model_type: str, name: str, stream_collapse: str, setting: str = "auto") -> str:
    """`final_state_source` from the target's model type, name and target.stream_collapse alone (no weights)."""
    setting = str(setting)
    if setting not in FINAL_STATE_SOURCES:
        raise ValueError(f"features.vllm_final_state={setting!r}; choose one of {FINAL_STATE_SOURCES}")
    if model_type == "deepseek_v4":
        if setting == "norm":
            raise ValueError(f"target {name}: features.vllm_final_state=norm cannot give DeepSeek-V4's final "
                             f"hidden state: vLLM's aux states are the mean of the 4 mHC streams and the final state "
                             f"mixes them through hc_head first; use features.vllm_final_state=engine (or auto)")
        if str(stream_collapse) != "mean":
            raise ValueError(f"target {name}: vLLM's DeepSeek-V4 averages the 4 mHC streams of every aux "
                             f"state, so features.source=vllm matches target.stream_collapse=mean only (this "
                             f"recipe has {stream_collapse}); set target.stream_collapse=mean or extract "
                             f"with transformers (features.source=online/hybrid, `deepspec data features`)")
        return "engine"
    return "engine" if setting == "engine" else "norm"


def vllm_layer_ids(layer_ids: Sequence[int], num_layers: int, final: str = "norm") -> list[int]:
    """vLLM's aux-state ids (sorted, as vLLM orders its rows) for deepspec taps ``layer_ids`` of an
    ``num_layers``-layer target, plus the final state's id: ``num_layers`` (pre-norm) for
    ``final="norm"``, ``num_layers + 1`` (deepspec's plugin) for ``final="engine"``."""
    for k in layer_ids:
        if not 0 <= int(k) < num_layers:
            raise ValueError(f"layer id {k} is outside the target's {num_layers} decoder layers (0..{num_layers - 1})")
    return sorted({int(k) + 1 for k in layer_ids} | {final_vllm_id(num_layers, final)})


def feature_rows(layer_ids: Sequence[int], num_layers: int, final: str = "norm") -> tuple[list[int], int]:
    """Where each deepspec tap (in ``layer_ids`` order) and the final state sit along the second axis of
    a vLLM hidden-states file written for ``vllm_layer_ids(layer_ids, num_layers, final)``."""
    ids = vllm_layer_ids(layer_ids, num_layers, final)
    return [ids.index(int(k) + 1) for k in layer_ids], ids.index(final_vllm_id(num_layers, final))


def final_vllm_id(num_layers: int, final: str) -> int:
    """vLLM's id of the final state: L (pre-norm) for "norm", L + 1 (deepspec's plugin) for "engine"."""
    if final not in ("norm", "engine"):
        raise ValueError(f"final={final!r}: 'norm' or 'engine'")
    return num_layers + (final == "engine")


def model_architectures(model: str | Path) -> list[str]:
    """The `architectures` of an HF model directory's config.json (what vLLM picks its class by)."""
    path = Path(model) / "config.json"
    try:
        archs = json.loads(path.read_text()).get("architectures") or []
    except (OSError, ValueError) as e:
        raise ValueError(f"features.vllm_final_state=engine wraps the model class vLLM picks from "
                         f"`architectures` in {path}, which cannot be read ({e}): pass the target as an HF "
                         f"directory") from e
    if not archs:
        raise ValueError(f"{path} names no `architectures`; vLLM needs one to pick the model class")
    return [str(a) for a in archs]


def server_command(python: str, model: str, aux_ids: Sequence[int], storage: str | Path, port: int,
                   host: str = "0.0.0.0", dtype: str = "auto", served_name: str | None = None,
                   max_model_len: int = 4096, extra: Sequence[str] = (), final: str = "norm") -> list[str]:
    """argv of a vLLM OpenAI server that extracts ``aux_ids`` into ``storage`` (a folder the
    readers see); no ``aux_ids``: a plain server (no extraction). ``extra``: further vLLM flags
    (tensor/expert parallel, quantization, ...). ``final="engine"``: deepspec's plugin gives the
    model classes in ``model``'s config.json the final state (aux id L + 1), set through `env` at the
    head of the command so the printed line is complete."""
    head = ["env", f"{FINAL_STATE_ENV}={','.join(model_architectures(model))}"] if final == "engine" else []
    cmd = [*head, python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", host,
           "--port", str(port), "--dtype", dtype, "--max-model-len", str(max_model_len),
           "--enable-prompt-tokens-details"]
    if aux_ids:
        spec = {"method": "extract_hidden_states", "num_speculative_tokens": 1,
                "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": [int(i) for i in aux_ids]}}}
        kv = {"kv_connector": CONNECTOR_CLASS, "kv_role": "kv_producer", "kv_connector_module_path": CONNECTOR_MODULE,
              "kv_connector_extra_config": {"shared_storage_path": str(storage)}}
        cmd += ["--speculative-config", json.dumps(spec), "--kv-transfer-config", json.dumps(kv)]
    if served_name:
        cmd += ["--served-model-name", served_name]
    return cmd + list(extra)


def server_env(base: dict | None = None) -> dict:
    """Environment of a vLLM server process: the plugin folder (connector, final-state plugin and its
    entry point) on PYTHONPATH."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PLUGIN_DIR), env.get("PYTHONPATH", "")) if p)
    return env


def vllm_python() -> Path:
    """The separate vLLM environment's python ($DEEPSPEC_VLLM_VENV, default .venv-vllm)."""
    venv = Path(os.environ.get("DEEPSPEC_VLLM_VENV", Path(__file__).resolve().parents[1] / ".venv-vllm"))
    py = venv / "bin" / "python"
    if not py.exists():
        raise FileNotFoundError(f"features.source=vllm without features.vllm_urls starts a local vLLM server from "
                                f"$DEEPSPEC_VLLM_VENV, but {py} does not exist: create it with "
                                f"`bash scripts/vllm_features_check.sh` (or scripts/engine_check.sh), set "
                                f"DEEPSPEC_VLLM_VENV, or pass features.vllm_urls=[http://HOST:PORT] of running "
                                f"servers (launch/vllm_features.sh)")
    return py


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str, timeout: float = 10.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


@contextlib.contextmanager
def local_server(model: str | Path, aux_ids: Sequence[int], storage: str | Path, dtype: str = "auto",
                 max_model_len: int = 4096, log: str | Path | None = None, ready_timeout_s: float = 1800.0,
                 extra: Sequence[str] = (), final: str = "norm") -> Iterator[str]:
    """A vLLM server on this machine for the duration of the block; yields its URL. CPU defaults
    (eager mode, 2 GiB of KV cache) unless the caller's environment sets them. ``final="engine"``:
    the model gives its own final state as aux id L + 1 (deepspec's plugin)."""
    port = _free_port()
    cmd = server_command(str(vllm_python()), str(model), aux_ids, storage, port, host="127.0.0.1", dtype=dtype,
                         max_model_len=max_model_len, extra=["--enforce-eager", *extra], final=final)
    env = server_env()
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    env.pop("DS_ACCELERATOR", None)
    log_path = Path(log) if log else Path(storage) / "vllm_server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            t0 = time.monotonic()
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the vLLM server exited with {proc.returncode} before it was ready; "
                                       f"see {log_path}")
                with contextlib.suppress(OSError):
                    _get_json(url + "/v1/models", timeout=5)
                    break
                if time.monotonic() - t0 > ready_timeout_s:
                    raise TimeoutError(f"the vLLM server was not ready after {ready_timeout_s:.0f} s; "
                                       f"see {log_path}")
                time.sleep(2)
            yield url
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


def read_hidden_states(path: str | Path, remove: bool = True) -> tuple[torch.Tensor, torch.Tensor, list[int] | None]:
    """(hidden_states [T, ids, D], token_ids [T], vllm_layer_ids or None) of one connector file,
    after the writer released ``<path>.lock``; the file and its lock are removed unless ``remove``
    is false."""
    path = str(path)
    lock = path + ".lock"
    with contextlib.ExitStack() as stack:
        if os.path.exists(lock):
            fh = stack.enter_context(open(lock))
            fcntl.flock(fh, fcntl.LOCK_SH)  # sleeps until the server's write is done
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            hidden, ids = f.get_tensor("hidden_states"), f.get_tensor("token_ids")
    if remove:
        for p in (path, lock):
            with contextlib.suppress(FileNotFoundError):
                os.remove(p)
    layers = json.loads(meta["vllm_layer_ids"]) if "vllm_layer_ids" in meta else None
    return hidden, ids, layers


def final_norm(target) -> torch.nn.Module:
    """The target's final norm, applied here to vLLM's last (pre-norm) hidden state (final state "norm")."""
    decoder = target.model.get_decoder() if hasattr(target.model, "get_decoder") else target.model
    norm = getattr(decoder, "norm", None)
    if norm is None:
        raise ValueError(f"target {target.name}: no final norm (`model.norm`) to apply to vLLM's last hidden "
                         f"state; set features.vllm_final_state=engine (the model's own final state, through "
                         f"deepspec's vLLM plugin)")
    return norm


class VllmExtractor:
    """``extractor(sequences) -> [SequenceFeatures]`` through vLLM servers at ``urls`` (round robin,
    ``concurrency`` requests in flight); features in the target's dtype on its device, like
    `data_tools.features.extract_features`. Counts what the servers computed (``stats``)."""

    def __init__(self, urls: Sequence[str], target, layer_ids: Sequence[int], concurrency: int = 8,
                 timeout_s: float = 600.0, cache_salt: str | None = None, final_state: str = "auto"):
        if not urls:
            raise ValueError("features.source=vllm needs features.vllm_urls=[http://HOST:PORT, ...] (servers started "
                             "with launch/vllm_features.sh), or none in `deepspec data features` to start one here")
        self.final = final_state_source(target, final_state)  # refuses what vLLM cannot give
        self.final_norm = final_norm(target) if self.final == "norm" else None
        self.urls = [u.rstrip("/").removesuffix("/v1") for u in urls]
        self.target, self.layer_ids = target, [int(k) for k in layer_ids]
        self.num_layers = target.num_layers
        self.aux_ids = vllm_layer_ids(self.layer_ids, self.num_layers, self.final)
        self.tap_rows, self.final_row = feature_rows(self.layer_ids, self.num_layers, self.final)
        self.concurrency, self.timeout_s = max(1, int(concurrency)), timeout_s
        self.cache_salt = cache_salt  # vLLM reuses cached prefixes only between requests with the same salt
        self.models = {u: self._served_model(u) for u in self.urls}
        self._next = itertools.cycle(self.urls)
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0}

    @staticmethod
    def _served_model(url: str) -> str:
        try:
            models = _get_json(url + "/v1/models")["data"]
        except (OSError, KeyError, ValueError) as e:
            raise ConnectionError(f"features.vllm_urls: no vLLM server answers at {url}/v1/models ({e}); start one "
                                  f"with launch/vllm_features.sh") from e
        return models[0]["id"]

    def _request(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden_states [T, ids, D], token_ids [T]) of the prefill of ``ids`` (``max_tokens=1``)."""
        _, hidden, got_ids = self.complete({"prompt": ids, "max_tokens": 1, "temperature": 0.0})
        if got_ids.tolist() != ids:
            raise RuntimeError(f"vLLM server returned hidden states for other token ids than sent "
                               f"({got_ids.numel()} vs {len(ids)} tokens)")
        return hidden, got_ids

    def complete(self, body: dict, kv_transfer_params: dict | None = None
                 ) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """Send one ``/v1/completions`` request (``body`` without the model) to the next server and read
        the hidden-states file it names: (reply, hidden_states [T, ids, D], token_ids [T]). Counts the
        request in ``stats``; ``kv_transfer_params`` go to the connector (e.g. include_output_tokens)."""
        with self._lock:
            url = next(self._next)
        body = {"model": self.models[url], **body, "kv_transfer_params": dict(kv_transfer_params or {})}
        if self.cache_salt:
            body["cache_salt"] = self.cache_salt
        req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                reply = json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"vLLM server {url} refused a {len(body['prompt'])}-token sequence: HTTP {e.code} "
                               f"{e.read()[:300]!r} (over the server's --max-model-len?)") from e
        path = (reply.get("kv_transfer_params") or {}).get("hidden_states_path")
        if not path:
            raise RuntimeError(f"vLLM server {url} returned no hidden_states_path: it was not started with "
                               f"deepspec's connector and extract_hidden_states (launch/vllm_features.sh)")
        usage = reply.get("usage") or {}
        with self._lock:
            self.stats["requests"] += 1
            self.stats["prompt_tokens"] += int(usage.get("prompt_tokens") or len(body["prompt"]))
            self.stats["cached_tokens"] += int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        try:
            hidden, got_ids, layers = read_hidden_states(path)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"vLLM server {url} wrote {path}, which this machine cannot read: the "
                                    f"server's shared_storage_path must be a folder both see") from e
        if layers is not None and layers != self.aux_ids:
            raise ValueError(f"vLLM server {url} extracts vLLM layers {layers}; this recipe's taps "
                             f"{self.layer_ids} + the final state ({self.final}) need {self.aux_ids}: restart it "
                             f"with launch/vllm_features.sh for this recipe")
        return reply, hidden, got_ids

    @torch.no_grad()
    def features(self, hidden_TND: torch.Tensor, ids_T: torch.Tensor, loss_mask: list[bool]) -> SequenceFeatures:
        """SequenceFeatures of one sequence from its rows of a hidden-states file (taps picked; the final
        state as the model gave it, or the target's final norm of vLLM's pre-norm last state), in the
        target's dtype and device."""
        device, dtype = self.target.device, self.target.dtype
        hidden_TND = hidden_TND.to(device=device, dtype=dtype)
        final = hidden_TND[:, self.final_row]
        if self.final_norm is not None:
            final = self.final_norm(final)  # vLLM id L is pre-norm
        return SequenceFeatures(ids_T.to(device), torch.tensor(loss_mask, dtype=torch.bool, device=device),
                                hidden_TND[:, self.tap_rows].clone(), final)

    @torch.no_grad()
    def __call__(self, sequences: Sequence[ChatSequence]) -> list[SequenceFeatures]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            replies = list(pool.map(lambda s: self._request(list(map(int, s.input_ids))), sequences))
        return [self.features(hidden_TND, ids, seq.loss_mask)
                for seq, (hidden_TND, ids) in zip(sequences, replies, strict=True)]


def serve_command_for_recipe(overrides: Sequence[str], model: str, storage: str, port: int = 8000,
                             python: str = "python", extra: Sequence[str] = ()) -> tuple[list[str], list[int]]:
    """(argv of the vLLM feature server for a recipe, the vLLM ids it extracts): the recipe's taps
    (drafter.layer_ids, resolved from the target's config without loading weights) + the final state."""
    from data_tools.commands import _layer_ids, target_shapes
    from deepspec.config import compose

    cfg = compose(list(overrides))
    shapes = target_shapes(cfg)
    final = resolve_final_state(shapes.model_type, str(cfg.target.name), cfg.target.stream_collapse,
                                cfg.features.vllm_final_state)
    aux = vllm_layer_ids(_layer_ids(cfg, shapes), shapes.num_layers, final)
    return server_command(python, model, aux, storage, port, max_model_len=cfg.data.max_seq_len + 1,
                          served_name=str(cfg.target.name), extra=extra, final=final), aux


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m data_tools.vllm_features --model DIR --storage DIR [--port 8000] recipe=NAME ... [-- VLLM FLAGS]`:
    print the vLLM server command (one shell-quoted line) for the recipe's feature stage."""
    import argparse
    import shlex
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python -m data_tools.vllm_features", description=main.__doc__)
    p.add_argument("--model", required=True, help="the target as an HF directory (what vLLM loads)")
    p.add_argument("--storage", required=True, help="shared folder the connector writes and the readers read")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--python", default="python", help="the vLLM environment's python")
    a, overrides = p.parse_known_args(argv)
    cmd, aux = serve_command_for_recipe(overrides, a.model, a.storage, a.port, a.python, extra)
    print(f"# vLLM ids {aux} (deepspec taps + 1, and the final state: the last id)", file=sys.stderr)
    print(shlex.join(cmd))


if __name__ == "__main__":
    main()
