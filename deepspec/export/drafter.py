"""Write a trained drafter for an engine (vllm | sglang) or as deepspec's own `hf` layout, and
read any of them back (`load_exported`), so a round trip gives identical logits.

Every export directory holds `config.json` (the engine's architecture and fields, plus a
`deepspec` entry with the spec, target shapes, taps in deepspec's convention, mask token and
STS temperatures) and the weights. The STS temperatures of the confidence head (DRAFT/sts.json,
written by `deepspec eval calibrate`) travel as `sts.json` and in config.json; vLLM/SGLang do
not apply them, and the summary says so.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from deepspec.drafters.io import CONFIG_FILE, STS_FILE, WEIGHTS_FILE, load_drafter, read_sts, save_drafter
from deepspec.drafters.registry import kind_entry
from deepspec.drafters.spec import DrafterSpec
from deepspec.export.checks import ExportCheckError, check_export
from deepspec.export.conventions import layer_id_field, tapped_output_layers, written_layer_ids
from deepspec.export.layouts import UNMAPPED_PREFIX, deepspec_block, deepspec_state, engine_layout
from deepspec.targets.shapes import TargetShapes

ENGINE_WEIGHTS = "model.safetensors"
FORMATS = ("vllm", "sglang", "hf", "llamacpp")  # llamacpp: the HF layout the GGUF converter reads
SGLANG_ALGORITHM = {"eagle3": "EAGLE3", "dspark": "DSPARK", "dflash": "DFLASH"}


def find_sts(draft_dir) -> list[float] | None:
    """STS temperatures stored with the drafter (DRAFT/sts.json), or None."""
    path = Path(draft_dir) / STS_FILE
    return read_sts(path) if path.is_file() else None


def export_drafter(drafter: nn.Module, fmt: str, output_dir, dtype: str = "bfloat16", check: bool = True,
                   sts_temperatures: list[float] | None = None, dflash_layout: str = "dspark") -> dict:
    """Write `drafter` in format `fmt` into `output_dir`; returns the summary (files, ids, warnings)."""
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}; choose one of {FORMATS} (or v4 for the DeepSeek-V4 mtp.* layout)")
    if not hasattr(torch, dtype) or not getattr(torch, dtype).is_floating_point:
        raise ValueError(f"export.dtype={dtype!r}; choose bfloat16, float16 or float32")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = drafter.spec
    warnings: list[str] = []
    if kind_entry(spec).calibrated_confidence and getattr(drafter, "confidence", None) is not None \
            and sts_temperatures is None:
        warnings.append("no STS temperatures found next to the drafter (DRAFT/sts.json): the confidence head is "
                        "exported uncalibrated; run `deepspec eval calibrate` first")
    if fmt == "hf":
        files = _write_hf(drafter, out, dtype, sts_temperatures)
        written_ids, field, method = list(spec.layer_ids), "layer_ids", None
        arch = kind_entry(spec).hf_architecture
    else:
        exp = engine_layout(drafter, fmt, dtype, sts_temperatures, dflash_layout)
        shapes = {k: tuple(v.shape) for k, v in exp.tensors.items()}
        if check:
            check_export(exp.config, shapes)
        elif any(k.startswith(UNMAPPED_PREFIX) for k in shapes):
            warnings.append("export.check=false: tensors with no engine name were written under "
                            f"'{UNMAPPED_PREFIX}*' and the engine will ignore or reject them")
        files = _write_engine(exp, out, sts_temperatures)
        field = layer_id_field(fmt, spec.kind)
        written_ids = written_layer_ids(exp.config, spec.kind)
        method, arch = exp.method, exp.architecture
        warnings += exp.notes
        if sts_temperatures is not None:
            warnings.append(f"{fmt} does not apply STS temperatures: they are carried in {STS_FILE} and "
                            f"config.json (confidence_sts_temperatures) for schedulers that read them")
        if not check:
            warnings.append("export.check=false: the key check was skipped")
    summary = {"format": fmt, "kind": spec.kind, "architecture": arch, "method": method, "output_dir": str(out),
               "dtype": dtype, "files": files, "mask_token_id": spec.mask_token_id,
               "sts_temperatures": sts_temperatures, "warnings": warnings,
               "layer_ids": {"deepspec": list(spec.layer_ids), "field": field, "written": written_ids,
                             "engine_taps_output_of": tapped_output_layers(fmt, spec.kind, written_ids)
                             if fmt != "hf" else list(spec.layer_ids)},
               "check": "n/a" if fmt == "hf" else ("passed" if check else "skipped")}
    if fmt == "vllm":
        summary["serve"] = (f"vllm serve TARGET_HF_DIR --speculative-config '{{\"method\": \"{method}\", "
                            f"\"model\": \"{out}\", \"num_speculative_tokens\": {spec.block_size}}}'")
    elif fmt == "sglang":
        summary["serve"] = (f"python -m sglang.launch_server --model-path TARGET_HF_DIR --speculative-algorithm "
                            f"{SGLANG_ALGORITHM[method]} --speculative-draft-model-path {out} "
                            f"--speculative-num-draft-tokens {spec.block_size}")
    return summary


def _write_sts(out: Path, sts_temperatures) -> list[str]:
    if sts_temperatures is None:
        return []
    (out / STS_FILE).write_text(json.dumps({"temperatures": sts_temperatures}, indent=2) + "\n")
    return [STS_FILE]


def _write_engine(exp, out: Path, sts_temperatures) -> list[str]:
    save_file(exp.tensors, str(out / ENGINE_WEIGHTS), metadata={"format": "pt", "producer": "deepspec"})
    (out / "config.json").write_text(json.dumps(exp.config, indent=2) + "\n")
    return ["config.json", ENGINE_WEIGHTS] + _write_sts(out, sts_temperatures)


def _write_hf(drafter: nn.Module, out: Path, dtype: str, sts_temperatures) -> list[str]:
    """deepspec's own layout: save_drafter files (in `dtype`) + config.json + sts.json."""
    save_drafter(out, drafter, dtype=getattr(torch, dtype))
    config = {"architectures": [kind_entry(drafter).hf_architecture], "model_type": "deepspec_drafter",
              "torch_dtype": dtype, "deepspec": deepspec_block(drafter, "hf", sts_temperatures)}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return ["config.json", CONFIG_FILE, WEIGHTS_FILE] + _write_sts(out, sts_temperatures)


def load_exported(directory, embed_tokens=None, lm_head_weight=None, map_location: str = "cpu") -> nn.Module:
    """A deepspec drafter from any export written here (vllm, sglang or hf), weights as written."""
    from deepspec.drafters import build_drafter

    src = Path(directory)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{src}: no config.json; not an export written by `deepspec export`")
    config = json.loads(config_path.read_text())
    meta = config.get("deepspec")
    if meta is None:
        raise ValueError(f"{config_path} has no 'deepspec' entry: only exports written by deepspec can be re-imported")
    if meta["engine"] == "hf":
        return load_drafter(src, embed_tokens, lm_head_weight, map_location)
    known = {f.name for f in fields(DrafterSpec)}
    spec = DrafterSpec(**{k: v for k, v in meta["spec"].items() if k in known})
    drafter = build_drafter(spec, TargetShapes.from_dict(meta["shapes"]))
    tensors = load_file(str(src / ENGINE_WEIGHTS), device=map_location)
    state = deepspec_state(config, tensors)
    own = drafter.state_dict()
    for name, t in own.items():  # match per-tensor precision of the export (confidence head stays fp32)
        if name in state and t.is_floating_point():
            own_param = _module_tensor(drafter, name)
            own_param.data = own_param.data.to(state[name].dtype)
    missing, unexpected = drafter.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportCheckError(f"{src}: re-import does not match a {spec.kind} drafter: missing {missing}, "
                               f"unexpected {unexpected}")
    drafter.to(map_location)
    if embed_tokens is not None and lm_head_weight is not None:
        drafter.attach_target(embed_tokens, lm_head_weight)
        if kind_entry(spec).prunes_vocab and "lm_head.weight" in tensors:
            written, own = tensors["lm_head.weight"], drafter.draft_lm_head()
            if not torch.equal(written, own.to(written.dtype)):
                raise ValueError(f"{src}: the exported lm_head is not the given target's LM head at the kept ids: "
                                 f"this export was written for another target")
    return drafter


def _module_tensor(module: nn.Module, name: str) -> torch.Tensor:
    *path, leaf = name.split(".")
    for p in path:
        module = getattr(module, p)
    return getattr(module, leaf)


def engine_tensor_shapes(directory) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors in an engine export (no data read)."""
    with safe_open(str(Path(directory) / ENGINE_WEIGHTS), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def check_export_dir(directory) -> None:
    """Re-run the key check on a written engine export (raises ExportCheckError)."""
    config = json.loads((Path(directory) / "config.json").read_text())
    check_export(config, engine_tensor_shapes(directory))

