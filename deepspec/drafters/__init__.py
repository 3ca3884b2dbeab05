"""Draft models (single-device; they know nothing of ranks): DSpark, DFlash, Eagle3.

`build_drafter(spec, shapes)` is the one constructor (through the kind registry,
`deepspec.drafters.registry`); `deepspec.drafters.io` saves/loads.
"""

from __future__ import annotations

from deepspec.drafters.base import DraftOutput, Proposal
from deepspec.drafters.registry import build_drafter, kind_entry
from deepspec.drafters.spec import DrafterSpec, default_layer_ids, resolve_spec
from deepspec.targets.shapes import TargetShapes

__all__ = ["DrafterSpec", "DraftOutput", "Proposal", "TargetShapes", "build_drafter", "default_layer_ids",
           "kind_entry", "resolve_spec"]
