"""Training checkpoints: a loadable drafter plus everything needed to resume exactly.

Layout under `output_dir/checkpoints/`:

    step_000050/                  every `save_every` steps; the last `keep_last` are kept
        drafter.safetensors       `save_drafter`: the directory works as `draft=PATH`
        drafter_config.json
        training_state.json       step, data position, best τ so far, config fingerprint
        rng/rank_00000.pt         python / numpy / torch / cuda RNG of every rank, as plain tensors
        engine/                   DeepSpeed checkpoint: weights, optimizer, lr scheduler
    final/                        the same, written at the end of the run
    best/                         drafter only: the held-out simulated-τ best (best.json says when)
    latest                        text file naming the newest complete checkpoint

A checkpoint directory is written under a temporary name and renamed when every rank
has finished, so `latest` never names half a checkpoint (SIGKILL-safe).

Loading runs no code from the checkpoint: the RNG files and DeepSpeed's engine files are read
with `torch.load(weights_only=True)` (tensors, numbers, strings and a few DeepSpeed value types
only; anything else is refused), the drafter weights are safetensors checked against their sha256.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from deepspec.drafters.io import save_drafter
from deepspec.runs import atomic_write
from deepspec.training.distributed import (DistEnv, barrier, full_parameters, load_engine_checkpoint,
                                           refusal_reason)

STATE_FILE = "training_state.json"


@dataclass
class TrainState:
    """Where training stands after `step` optimizer steps."""

    step: int = 0
    epoch: int = 0
    best_tau: Optional[float] = None
    best_step: Optional[int] = None
    initial_tau: Optional[float] = None


def checkpoints_dir(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def rng_state() -> dict:
    """Every RNG's state as tensors and numbers only (loadable with weights_only=True)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_rng_file(path: Path) -> dict:
    """A rank's RNG file, read without running code; a damaged or foreign file is refused."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the checkpoint is incomplete (or was written with another "
                                f"number of ranks); resume from another checkpoint")
    try:
        state = torch.load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{path} holds Python objects deepspec never writes there (only tensors and numbers), "
                         f"and was not loaded because unpickling them could run code "
                         f"({refusal_reason(exc)}); resume only from checkpoints you or this deepspec "
                         f"version wrote, or start afresh (resume=none)") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"{path} cannot be read ({str(exc).splitlines()[0]}): the file is truncated or "
                         f"damaged; resume from another checkpoint (e.g. an earlier step_* directory)") from None
    if not isinstance(state, dict) or not {"python", "numpy", "torch"} <= set(state) \
            or not isinstance(state["python"], dict):
        raise ValueError(f"{path} is not an RNG state written by this deepspec version; resume from a "
                         f"checkpoint it wrote, or start afresh (resume=none)")
    return state


def save_checkpoint(engine, drafter: torch.nn.Module, output_dir, name: str, state: TrainState,
                    fingerprint: dict, keep_last: int, env: DistEnv) -> Path:
    """Write checkpoint `name` (collective: every rank calls it); returns its directory."""
    root = checkpoints_dir(output_dir)
    final, tmp = root / name, root / f".{name}.tmp"
    if env.is_rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    barrier()
    engine.save_checkpoint(str(tmp), tag="engine", save_latest=False)
    torch.save(rng_state(), tmp / "rng" / f"rank_{env.rank:05d}.pt")
    with full_parameters(drafter):
        if env.is_rank0:
            save_drafter(tmp, drafter, target=fingerprint.get("target"))
    barrier()
    if env.is_rank0:
        record = {**asdict(state), "world_size": env.world_size, "fingerprint": fingerprint}
        atomic_write(tmp / STATE_FILE, json.dumps(record, indent=2) + "\n")
        if final.exists():
            old = root / f".{name}.old"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(final)
        atomic_write(root / "latest", name + "\n")
        _rotate(root, keep_last)
    barrier()
    return final


def _rotate(root: Path, keep_last: int) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def save_best(drafter: torch.nn.Module, output_dir, step: int, tau: float, env: DistEnv,
              target: Optional[dict] = None) -> Path:
    """Drafter weights of the best held-out simulated τ so far, in `checkpoints/best` (draft=PATH);
    `target`: the identity of the target it belongs to."""
    best = checkpoints_dir(output_dir) / "best"
    with full_parameters(drafter):
        if env.is_rank0:
            tmp = best.with_name(".best.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            save_drafter(tmp, drafter, target=target)
            atomic_write(tmp / "best.json", json.dumps({"step": step, "simulated_tau": tau}) + "\n")
            shutil.rmtree(best, ignore_errors=True)
            tmp.rename(best)
    barrier()
    return best


def is_complete(path: Path) -> bool:
    return (path / STATE_FILE).exists() and (path / "engine").is_dir()


def find_resume(output_dir, resume: str) -> Optional[Path]:
    """The checkpoint to resume from: resume=none -> None; auto -> latest under output_dir (None if
    there is none); anything else is a checkpoint directory that must exist."""
    if resume in ("none", "", None):
        return None
    if resume == "auto":
        root = checkpoints_dir(output_dir)
        pointer = root / "latest"
        if pointer.exists():
            path = root / pointer.read_text().strip()
            if is_complete(path):
                return path
        steps = sorted(p for p in root.glob("step_*") if is_complete(p))
        return steps[-1] if steps else None
    path = Path(resume)
    if path.is_dir() and not is_complete(path) and is_complete(path / "checkpoints" / "final"):
        path = path / "checkpoints" / "final"  # a run directory: its final checkpoint
    if not is_complete(path):
        raise FileNotFoundError(f"resume={resume}: not a training checkpoint (needs {STATE_FILE} and engine/); "
                                f"use a directory like OUTPUT/checkpoints/step_000050, resume=auto or resume=none")
    return path


def fingerprint_diff(saved: dict, current: dict) -> list[str]:
    """`key: saved -> current` for every key whose value differs."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def load_checkpoint(engine, path: Path, fingerprint: dict, env: DistEnv) -> TrainState:
    """Restore engine (weights, optimizer, scheduler), this rank's RNG and the training state.

    Refuses a checkpoint whose config fingerprint differs from this run's, naming the keys.
    """
    try:
        record: dict[str, Any] = json.loads((path / STATE_FILE).read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path / STATE_FILE} is not valid JSON ({exc}): the checkpoint is damaged; resume "
                         f"from another one (e.g. an earlier step_* directory)") from None
    diff = fingerprint_diff(record.get("fingerprint", {}), fingerprint)
    if record.get("world_size") != env.world_size:
        diff.append(f"world_size: {record.get('world_size')} -> {env.world_size}")
    if diff:
        raise ValueError(f"cannot resume from {path}: it was written by a different configuration; differing "
                         f"keys: {'; '.join(diff)}. Resume with the checkpoint's settings, or start afresh with "
                         f"resume=none (init_from={path} warm-starts from its weights)")
    rng = load_rng_file(path / "rng" / f"rank_{env.rank:05d}.pt")
    load_engine_checkpoint(engine, path, tag="engine")
    set_rng_state(rng)
    fields = {k: record[k] for k in TrainState.__dataclass_fields__ if k in record}
    return TrainState(**fields)


def load_weights(drafter: torch.nn.Module, path, target: Optional[dict] = None) -> dict:
    """Warm start (init_from): copy a saved drafter's weights into `drafter`; no optimizer state.

    Returns the source's drafter config. Refuses a drafter of another shape, naming the tensors,
    a damaged weights file (sha256) and a drafter recorded for other target weights than `target`.
    """
    from deepspec.drafters.io import CONFIG_FILE, WEIGHTS_FILE, check_target, read_config, read_weights

    src = Path(path)
    if not (src / WEIGHTS_FILE).exists() and (src / "checkpoints" / "final" / WEIGHTS_FILE).exists():
        src = src / "checkpoints" / "final"
    if not (src / WEIGHTS_FILE).exists():
        raise FileNotFoundError(f"init_from={path}: no {WEIGHTS_FILE} there; point it at a checkpoint directory "
                                f"(e.g. RUN/checkpoints/final) or a run directory")
    if target is not None:
        check_target(src, target)
    saved = read_weights(src)
    own = drafter.state_dict()
    bad = [f"{k} {tuple(saved[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
           if k in saved and saved[k].shape != v.shape]
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    if bad or missing or unexpected:
        raise ValueError(f"init_from={src}: the saved drafter does not fit this run's drafter: shape mismatches "
                         f"{bad[:5]}, missing {missing[:5]}, unexpected {unexpected[:5]}; check drafter.* and "
                         f"the target against {src / CONFIG_FILE}")
    drafter.load_state_dict({k: v.to(own[k].dtype) for k, v in saved.items()})
    return read_config(src)


def clear_run(output_dir) -> None:
    """overwrite=true: delete the previous run's checkpoints, metrics and logs from `output_dir`
    (called when the new run starts, after every check passed)."""
    out = Path(output_dir)
    for name in ("checkpoints", "tensorboard", "wandb"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("metrics.jsonl", "loss_curve.png", "summary.json", "config.yaml"):
        (out / name).unlink(missing_ok=True)
