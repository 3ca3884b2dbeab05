"""The typed config stops a bad command before anything heavy loads, through the real console script."""

from __future__ import annotations

import subprocess
import sys

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
