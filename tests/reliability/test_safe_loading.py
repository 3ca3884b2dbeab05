"""Loading a checkpoint never runs code from it, and damaged files are refused with a message
(issue rows 2, 9, 10): the RNG files and DeepSpeed's engine files are read weights-only, drafter
weights are checked against the sha256 recorded beside them."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from deepspec.cli import main
from deepspec.drafters.io import WEIGHTS_FILE, load_drafter
from deepspec.training.checkpoint import rng_state, set_rng_state
from tests.reliability.conftest import train_args


class _Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def load_rng_file(path):
    from deepspec.training.checkpoint import load_rng_file

    return load_rng_file(path)


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(load_rng_file(tmp_path / "rng.pt"))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_an_rng_file_holding_a_pickled_callable_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"python": _Payload(marker)}, tmp_path / "rng.pt")
    with pytest.raises(ValueError, match="could run code"):
        load_rng_file(tmp_path / "rng.pt")
    assert not marker.exists()


def test_a_truncated_rng_file_is_named(tmp_path):
    torch.save(rng_state(), tmp_path / "rng.pt")
    data = (tmp_path / "rng.pt").read_bytes()
    (tmp_path / "rng.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or damaged"):
        load_rng_file(tmp_path / "rng.pt")


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["rng/rank_00000.pt", "engine/mp_rank_00_model_states.pt"])
def test_resume_from_a_checkpoint_with_a_pickled_callable_fails_without_running_it(run_copy, tmp_path, capsys,
                                                                                   victim):
    R, T = run_copy
    ckpt = T / "checkpoints" / "final"
    marker = tmp_path / "pwned"
    torch.save({"module": _Payload(marker), "python": _Payload(marker)}, ckpt / victim)
    assert main(train_args(R, tmp_path / "new", "trainer.max_steps=3", f"resume={ckpt}")) == 1
    err = capsys.readouterr().err
    assert "could run code" in err and "Traceback" not in err
    assert not marker.exists()


@pytest.mark.slow
def test_bit_flipped_or_truncated_drafter_weights_are_refused(run_copy, tmp_path, capsys):
    _, T = run_copy
    ckpt = T / "checkpoints" / "final"
    weights = ckpt / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-7] ^= 0x40  # one bit in the last tensor's data
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_drafter(ckpt)
    assert main(["export", "recipe=dspark_smollm2", f"draft={ckpt}", "format=hf",
                 f"output_dir={tmp_path / 'E'}"]) == 1
    assert "does not match the sha256" in capsys.readouterr().err
    weights.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match="truncated or corrupted"):
        load_drafter(ckpt)


@pytest.mark.slow
def test_saved_drafters_record_their_checksum_and_target(trained_run):
    _, T = trained_run
    for name in ("final", "best"):
        config = json.loads((T / "checkpoints" / name / "drafter_config.json").read_text())
        assert len(config["sha256"]) == 64
        assert config["target"]["name"] == "tiny-llama" and len(config["target"]["weights"]) == 16
