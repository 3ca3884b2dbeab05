"""Save / load a trained drafter: `drafter.safetensors` + `drafter_config.json` (+ `sts.json`).

The config holds the resolved DrafterSpec, the TargetShapes and the tapped layer ids, with a
format version. The target's embedding and LM head are never saved (they are not part of
the drafter's state_dict); pass them to `load_drafter` to get a drafter ready to run.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

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


def save_drafter(directory, drafter: nn.Module) -> Path:
    """Write the drafter's weights and config into `directory` (created if missing)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in drafter.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format_version": str(FORMAT_VERSION)})
    config = {"format_version": FORMAT_VERSION, "kind": drafter.spec.kind, "spec": asdict(drafter.spec),
              "shapes": drafter.shapes.to_dict(), "layer_ids": list(drafter.spec.layer_ids)}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def load_drafter(directory, embed_tokens=None, lm_head_weight: Optional[Tensor] = None,
                 map_location: str = "cpu") -> nn.Module:
    """Rebuild a drafter saved by `save_drafter`; attach the target's weights when given."""
    from deepspec.drafters import build_drafter

    src = Path(directory)
    cfg_path = src / CONFIG_FILE
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} not found: {src} is not a drafter saved by save_drafter")
    config = json.loads(cfg_path.read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: format_version {config.get('format_version')}; this deepspec reads "
                         f"version {FORMAT_VERSION}")
    drafter = build_drafter(DrafterSpec(**config["spec"]), TargetShapes.from_dict(config["shapes"]))
    state = load_file(str(src / WEIGHTS_FILE), device=map_location)
    float_dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(float_dtypes) == 1:  # keep the saved precision (bf16 checkpoints stay bf16)
        drafter.to(float_dtypes.pop())
    drafter.load_state_dict(state)
    drafter.to(map_location)
    if embed_tokens is not None and lm_head_weight is not None:
        drafter.attach_target(embed_tokens, lm_head_weight)
    return drafter
