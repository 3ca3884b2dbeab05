"""Every recipe composes against the typed schema; typos and bad values fail with the closest valid ones
named (through the command line: tests/integration/test_config_cli.py)."""

from __future__ import annotations

import re
import shutil

import pytest

from deepspec.config import ConfigError, compose, list_recipes, recipes_dir

RECIPES = [name for name, _ in list_recipes()]
REQUIRED = {"dspark_smollm2", "dflash_smollm2", "eagle3_smollm2"}


def test_cpu_recipes_exist_with_a_purpose():
    assert REQUIRED <= set(RECIPES)
    for name, desc in list_recipes():
        assert desc, f"recipe {name} has no description line"


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_and_says_how_to_launch(recipe):
    cfg = compose([f"recipe={recipe}"])
    assert cfg.recipe == recipe
    assert cfg.output_dir == f"runs/{recipe}"  # deterministic, no timestamps
    text = (recipes_dir() / f"{recipe}.yaml").read_text()
    assert text.startswith("#")
    parents = [n for n in RECIPES if f"- {n}\n" in text]  # a recipe may extend another recipe
    assert "deepspec_schema" in text or parents, "a recipe composes the typed schema (directly or via a parent)"
    assert any(w in text.lower() for w in ("launch", "deepspec train", "torchrun")), "header must say how to launch"


def test_wrong_type_and_unknown_recipe_are_clear():
    with pytest.raises(ConfigError, match="trainer.keep_last=abc"):
        compose(["recipe=dspark_smollm2", "trainer.keep_last=abc"])
    with pytest.raises(ConfigError, match="closest: dspark_smollm2"):
        compose(["recipe=dspark_smolm2"])
    with pytest.raises(ConfigError, match="recipe=NAME is required"):
        compose([])


def test_group_override_and_values():
    cfg = compose(["recipe=dspark_smollm2", "deepspeed=zero3", "trainer.max_steps=7", "output_dir=/tmp/x"])
    assert cfg.deepspeed.zero_stage == 3 and cfg.trainer.max_steps == 7 and cfg.output_dir == "/tmp/x"
    cfg = compose(["recipe=dspark_smollm2", "data.sources=[sharegpt]"])
    assert list(cfg.data.sources) == ["sharegpt"]


@pytest.mark.parametrize("override, named", [
    ("trainer.schedule=cosin", "did you mean 'cosine'"),
    ("drafter.kind=eagle", "did you mean 'eagle3'"),
    ("features.dtype=bf61", "did you mean 'bf16'"),
    ("eval.kernel=tritn", "did you mean 'triton'"),
    ("format=hf-targt", "did you mean 'hf-target'"),
    ("deepspeed=zero5", "did you mean 'zero3'"),
    ("eval.benchmarks=[gsm8j]", "did you mean 'gsm8k'"),
])
def test_enumerated_values_fail_at_compose_with_the_closest_value(override, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        compose(["recipe=dspark_smollm2", override])


def test_a_bad_value_inside_a_recipe_file_is_named_too(tmp_path, monkeypatch):
    import deepspec.config as config

    for name in ("recipes", "configs"):
        shutil.copytree(getattr(config, f"{name}_dir")(), tmp_path / name)
    (tmp_path / "recipes" / "broken.yaml").write_text("defaults:\n  - dspark_smollm2\n  - _self_\n"
                                                       "trainer:\n  precision: bf61\n")
    monkeypatch.setattr(config, "_asset_dir", lambda name: tmp_path / name)
    with pytest.raises(ConfigError, match=r"trainer.precision.*did you mean 'bf16'"):
        compose(["recipe=broken"])


@pytest.mark.parametrize("override, message", [
    ("trainer.warmup_ratio=1.5", "trainer.warmup_ratio=1.5 must be in [0, 1]"),
    ("trainer.global_batch=10", "not a multiple of trainer.micro_batch"),
    ("drafter.mask_token_id=null", "drafter.mask_token_id is required for kind=dspark"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage=4; choose 0, 1, 2 or 3"),
    ("target.device=gpu", "target.device=gpu is not a device"),
    ("data.weights=[1.0]", "data.weights has 1 entries for 2 data.sources"),
    ("regen.max_error_fraction=1.5", "regen.max_error_fraction=1.5 must be in [0, 1]"),
])
def test_cross_field_problems_fail_at_compose(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        compose(["recipe=dspark_smollm2", override])


def test_enumerations_match_the_library_checks():
    from data_tools.cache import STORAGE_DTYPES
    from data_tools.vllm_features import FINAL_STATE_SOURCES
    from deepspec.choices import BudgetScheduler, StorageDtype, StreamCollapse, VllmFinalState
    from deepspec.drafters.layers import BACKBONES
    from deepspec.drafters.registry import KINDS
    from deepspec.drafters.spec import Backbone, Kind
    from deepspec.drafters.v4 import V4DraftLayer  # noqa: F401  (registers the v4 backbone)
    from deepspec.eval.setup import SCHEDULERS
    from deepspec.features import STORAGE_BYTES
    from deepspec.targets.frozen import COLLAPSE_RULES

    assert set(StorageDtype) == set(STORAGE_DTYPES) == set(STORAGE_BYTES)
    assert set(StreamCollapse) == set(COLLAPSE_RULES)
    assert set(VllmFinalState) == set(FINAL_STATE_SOURCES)
    assert set(BudgetScheduler) == set(SCHEDULERS)
    assert set(Backbone) == set(BACKBONES)
    assert set(Kind) == set(KINDS)
