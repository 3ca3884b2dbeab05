"""The config through the command line: every recipe prints with --cfg job, typos are named, the deepspeed
launcher's argument is ignored, and a bad value stops the command before anything heavy loads."""

from __future__ import annotations

import subprocess
import sys

import pytest

from deepspec.cli import main
from deepspec.config import list_recipes

RECIPES = [name for name, _ in list_recipes()]
REQUIRED = {"dspark_smollm2", "dflash_smollm2", "eagle3_smollm2"}

CHECK = """
import sys
from deepspec.cli import main
rc = main(sys.argv[1:])
loaded = [m for m in ("transformers", "deepspeed", "data_tools.features") if m in sys.modules]
print("LOADED", loaded)
sys.exit(rc)
"""


def test_a_misspelled_schedule_fails_before_any_model_loads_naming_cosine(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", CHECK, "train", "recipe=dspark_smollm2",
                           "trainer.schedule=cosin", f"output_dir={out}"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "trainer.schedule=cosin" in proc.stderr and "did you mean 'cosine'" in proc.stderr
    assert "LOADED []" in proc.stdout  # neither the target's library nor DeepSpeed was imported
    assert not out.exists()  # stopped before the output directory was made


def test_the_console_script_reports_the_same_error():
    proc = subprocess.run(["deepspec", "train", "recipe=dspark_smollm2", "trainer.schedule=cosin"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "did you mean 'cosine'" in proc.stderr


@pytest.mark.parametrize("recipe", RECIPES)
def test_cli_cfg_job_exits_zero_for_every_recipe(recipe, capsys):
    assert main(["train", f"recipe={recipe}", "--cfg", "job"]) == 0
    assert f"recipe: {recipe}" in capsys.readouterr().out


def test_typo_names_the_valid_key(capsys):
    assert main(["train", "recipe=dspark_smollm2", "trainer.max_stepz=1"]) != 0
    err = capsys.readouterr().err
    assert "trainer.max_stepz" in err and "trainer.max_steps" in err


def test_local_rank_argument_never_reaches_hydra(capsys):
    assert main(["train", "--local_rank=0", "recipe=dspark_smollm2", "--cfg", "job"]) == 0


def test_recipes_command_lists_all(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in REQUIRED:
        assert name in out
