"""Draft models (single-device; they know nothing of ranks): DSpark, DFlash, Eagle3.

`build_drafter(spec, shapes)` is the one constructor; `deepspec.drafters.io` saves/loads.
"""

from __future__ import annotations

from torch import nn

from deepspec.drafters.base import DraftOutput, Proposal
from deepspec.drafters.spec import DrafterSpec, default_layer_ids, resolve_spec
from deepspec.targets.shapes import TargetShapes


def build_drafter(spec: DrafterSpec, shapes: TargetShapes) -> nn.Module:
    """A fresh drafter of `spec.kind` in the target's shapes (call `attach_target` before use)."""
    if spec.backbone == "v4" and spec.kind in ("dspark", "dflash"):  # MoE + mHC layers (SPEC §7)
        from deepspec.drafters.v4 import V4DSparkDrafter
        return V4DSparkDrafter(spec, shapes)
    if spec.kind == "dflash":
        from deepspec.drafters.dflash import DFlashDrafter
        return DFlashDrafter(spec, shapes)
    if spec.kind == "dspark":
        from deepspec.drafters.dspark import DSparkDrafter
        return DSparkDrafter(spec, shapes)
    if spec.kind == "eagle3":
        from deepspec.drafters.eagle3 import Eagle3Drafter
        return Eagle3Drafter(spec, shapes)
    raise ValueError(f"drafter.kind={spec.kind!r}; choose dspark, dflash or eagle3")


__all__ = ["DrafterSpec", "DraftOutput", "Proposal", "TargetShapes", "build_drafter", "default_layer_ids",
           "resolve_spec"]
