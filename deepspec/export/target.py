"""Write a target (embedded GGUF, .gguf file, local dir) as a Hugging Face directory engines load.

vLLM and SGLang read the target from a plain HF directory: `config.json` + safetensors weights
+ tokenizer files + `generation_config.json`. A GGUF target is dequantised by `transformers`
on load; its config then still carries a `quantization_config` (gguf) that an engine would
act on, so it is removed before writing. Used by `deepspec export format=hf-target`
and by the engine check (scripts/engine_check.sh).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from deepspec.targets.loading import load_model, load_tokenizer, torch_dtype

TARGET_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json")


def export_target(source: str, output_dir: str | Path, gguf_file: str | None = None, dtype: str = "float32",
                  chat_template: str | None = None, random_config: dict | None = None, seed: int = 0,
                  tokenizer_source: str | None = None) -> dict:
    """Dequantise/load `source` and write it as an HF directory; returns {files, seconds, ...}.

    `dtype` is the dtype the weights are written in (float32 keeps the dequantised values exact).
    A `random:<model_type>` source is built from `random_config` (the target config's; without it the
    family's full-size defaults, e.g. a 284B DeepSeek-V4, would be allocated) and needs
    `tokenizer_source` (target.tokenizer).
    """
    t0 = time.perf_counter()
    if source.startswith("random:") and not tokenizer_source:
        raise ValueError(f"target source {source}: a random target has no tokenizer of its own; set target.tokenizer")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(source, gguf_file, torch_dtype(dtype), None, dict(random_config or {}), seed)
    tok_source = tokenizer_source or source
    tokenizer = load_tokenizer(tok_source, gguf_file if tok_source == source else None)
    if chat_template:
        tokenizer.chat_template = chat_template
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    # save_pretrained refuses a GGUF-loaded model (its quantizer stays attached): write the parts.
    save_file(plain_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = config.get("architectures") or [type(model).__name__]
    config["torch_dtype"] = config["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    model.generation_config.to_json_file(str(out / "generation_config.json"))
    tokenizer.save_pretrained(str(out))
    check_target_dir(out)
    files = sorted(p.name for p in out.iterdir() if p.is_file() and not p.name.startswith("."))
    return {"format": "hf-target", "source": source, "output_dir": str(out), "files": files,
            "architectures": config.get("architectures"), "num_hidden_layers": config.get("num_hidden_layers"),
            "vocab_size": config.get("vocab_size"), "dtype": dtype, "seconds": round(time.perf_counter() - t0, 1)}


def plain_state_dict(model: nn.Module) -> dict:
    """Contiguous CPU copies of every weight; a tied LM head is left out (engines re-tie it)."""
    state = dict(model.state_dict())
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied and "lm_head.weight" in state:
        state.pop("lm_head.weight")
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def check_target_dir(directory: str | Path) -> None:
    """Raise ValueError when `directory` is not an HF target an engine can load as it is."""
    d = Path(directory)
    config_path = d / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{d}: no config.json; write the target with `deepspec export format=hf-target`")
    config = json.loads(config_path.read_text())
    problems = []
    if "quantization_config" in config:
        problems.append("config.json holds a quantization_config (the weights are dequantised)")
    if not config.get("architectures"):
        problems.append("config.json has no `architectures`")
    if not list(d.glob("*.safetensors")):
        problems.append("no *.safetensors weights")
    if not (d / "tokenizer.json").is_file() and not (d / "tokenizer.model").is_file():
        problems.append("no tokenizer.json / tokenizer.model")
    if problems:
        raise ValueError(f"target directory {d} cannot be served: " + "; ".join(problems))
