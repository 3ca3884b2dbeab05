"""Save / load a trained drafter: `drafter.safetensors` + `drafter_config.json` (+ `sts.json`).

The config holds the resolved DrafterSpec, the TargetShapes and the tapped layer ids, with a
format version, the sha256 of the weights file (checked on every load: a truncated or bit-flipped
file is refused) and, when known, the identity of the target it was trained against (name,
shapes, weights fingerprint, source). The target's embedding and LM head are never saved (they
are not part of the drafter's state_dict); pass them to `load_drafter` to get a drafter ready to run.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from deepspec.drafters.spec import DrafterSpec
from deepspec.targets.shapes import TargetShapes

FORMAT_VERSION = 1
WEIGHTS_FILE = "drafter.safetensors"
CONFIG_FILE = "drafter_config.json"
STS_FILE = "sts.json"  # confidence-head temperatures written by `deepspec eval calibrate`


def resolve_draft_dir(draft) -> Path:
    """`draft=PATH` as every command reads it: a checkpoint directory holding `save_drafter` output, or a
    run directory written by `deepspec train` (resolved to its checkpoints/final)."""
    if not draft:
        raise ValueError("draft=PATH is required: a run directory written by `deepspec train` (e.g. "
                         "runs/dspark) or one of its checkpoints (runs/dspark/checkpoints/best)")
    path = Path(draft)
    if not (path / CONFIG_FILE).is_file() and (path / "checkpoints" / "final" / CONFIG_FILE).is_file():
        path = path / "checkpoints" / "final"
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"draft={draft}: no {CONFIG_FILE} there; point it at a run directory written "
                                f"by `deepspec train` or at one of its checkpoints (RUN/checkpoints/final or "
                                f"RUN/checkpoints/best)")
    return path


def read_sts(path) -> list[float]:
    """The STS temperatures in a `sts.json` file."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "temperatures" not in data:
        raise ValueError(f"{path} holds no 'temperatures'; rewrite it with `deepspec eval calibrate`")
    return [float(t) for t in data["temperatures"]]


def save_drafter(directory, drafter: nn.Module, target: Optional[dict] = None,
                 dtype: Optional[torch.dtype] = None) -> Path:
    """Write the drafter's weights (floating tensors cast to `dtype` when given) and config into
    `directory` (created if missing); `target` is the identity of the target it belongs to."""
    from deepspec.atomic import file_sha256

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in drafter.state_dict().items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format_version": str(FORMAT_VERSION)})
    config = {"format_version": FORMAT_VERSION, "kind": drafter.spec.kind, "spec": asdict(drafter.spec),
              "shapes": drafter.shapes.to_dict(), "layer_ids": list(drafter.spec.layer_ids),
              "sha256": file_sha256(out / WEIGHTS_FILE)}
    if target is not None:
        config["target"] = target
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def read_config(directory) -> dict:
    """drafter_config.json of a saved drafter (clear errors for a missing or damaged file)."""
    cfg_path = Path(directory) / CONFIG_FILE
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} not found: {directory} is not a drafter saved by save_drafter")
    try:
        config = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{cfg_path} is not valid JSON ({exc}): the checkpoint is damaged; use another "
                         f"checkpoint (e.g. an earlier step_* directory)") from None
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: format_version {config.get('format_version')}; this deepspec reads "
                         f"version {FORMAT_VERSION}")
    return config


def read_weights(directory, map_location: str = "cpu") -> dict[str, Tensor]:
    """The saved state dict, after checking the file against the sha256 its config records."""
    from deepspec.atomic import file_sha256

    src = Path(directory)
    config, weights = read_config(src), src / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing: {src} is an incomplete checkpoint; use another one")
    want = config.get("sha256")
    if want is not None and file_sha256(weights) != want:
        raise ValueError(f"{weights} does not match the sha256 recorded in {src / CONFIG_FILE} (truncated or "
                         f"corrupted); use another checkpoint (e.g. an earlier step_* directory) or retrain")
    return load_file(str(weights), device=map_location)


def check_target(directory, target: dict) -> None:
    """Refuse a drafter recorded for a target with other weights than `target` (an identity dict)."""
    from deepspec.guards import weights_mismatch

    recorded = read_config(directory).get("target")
    if recorded is None:
        return  # saved before targets were recorded: nothing to compare
    problem = weights_mismatch(f"the drafter at {directory}", recorded, target)
    if problem:
        raise ValueError(problem)


def load_drafter(directory, embed_tokens=None, lm_head_weight: Optional[Tensor] = None,
                 map_location: str = "cpu") -> nn.Module:
    """Rebuild a drafter saved by `save_drafter`; attach the target's weights when given."""
    from deepspec.drafters import build_drafter

    src = Path(directory)
    config = read_config(src)
    drafter = build_drafter(DrafterSpec(**config["spec"]), TargetShapes.from_dict(config["shapes"]))
    state = read_weights(src, map_location)
    float_dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(float_dtypes) == 1:  # keep the saved precision (bf16 checkpoints stay bf16)
        drafter.to(float_dtypes.pop())
    drafter.load_state_dict(state)
    drafter.to(map_location)
    if embed_tokens is not None and lm_head_weight is not None:
        drafter.attach_target(embed_tokens, lm_head_weight)
    return drafter
