"""Data tools (`deepspec data ...`): prompts, answer regeneration, the target-feature cache.

Importing the package registers what deepspec looks up by name, so deepspec never imports
data_tools: the implementation of `deepspec.features.open_feature_splits` (loaded when first
used) and the folder of shipped files recipes name as `${asset:NAME}`.
"""

from __future__ import annotations

from pathlib import Path

from deepspec.config import register_asset_dir
from deepspec.features import register_feature_provider

register_asset_dir(Path(__file__).resolve().parent / "assets")
register_feature_provider("data_tools.features:open_feature_splits")
