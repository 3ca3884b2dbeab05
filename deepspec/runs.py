"""Run directories, summaries and rank-0 console output shared by every command."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig

from deepspec.atomic import atomic_write_text


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_rank0() -> bool:
    return rank() == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """print() on rank 0 only (nanochat's habit): every rank computes, one talks."""
    if is_rank0():
        print(*args, **kwargs, flush=True)


def prepare_output_dir(cfg: DictConfig) -> Path:
    """Create `cfg.output_dir` and record the composed config in it, secrets redacted (rank 0 writes)."""
    from deepspec.guards import redacted_yaml

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if is_rank0():
        atomic_write(out / "config.yaml", redacted_yaml(cfg))
    return out


_pending_config: list[DictConfig] = []


def defer_config(cfg: DictConfig | None) -> None:
    """Hold `cfg` until the command's run starts (`run_started`): a command refused by its checks
    leaves the config.yaml of the run already in output_dir untouched. None drops what is held."""
    _pending_config[:] = [] if cfg is None else [cfg]


def run_started() -> None:
    """Called by a command once its inputs and settings are validated, before its first write:
    records the deferred config as output_dir/config.yaml (once; a no-op without one)."""
    if _pending_config:
        prepare_output_dir(_pending_config.pop())


def check_output_dir(output_dir: str | Path) -> Path:
    """Refuse an output_dir that is a file or cannot be written, before anything is written."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir={out} is a file, not a folder: choose a folder path (it is created)")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"output_dir={out}: cannot write in {probe} (read-only or not yours); "
                         f"choose a writable output_dir")
    return out


def os_error_message(exc: OSError) -> str:
    """An OSError as one line naming the file and what to do."""
    import errno

    where = f" ({exc.filename})" if exc.filename else ""
    hint = {errno.ENOSPC: "free some space or point output_dir at a larger disk, then rerun the same command "
                          "(finished work is kept)",
            errno.EDQUOT: "free some space or raise the quota, then rerun the same command",
            errno.EACCES: "choose a folder you can write, or fix its permissions",
            errno.EROFS: "the file system is read-only: choose another output_dir"}.get(
        exc.errno, "check the path and rerun")
    return f"{exc.strerror or exc}{where}: {hint}"


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: readers never see half a file."""
    atomic_write_text(path, text)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item") and callable(x.item) and getattr(x, "ndim", 1) == 0:
        x = x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_summary(output_dir: str | Path, summary: dict) -> Path:
    """Write `summary.json` (the command's headline figures) on rank 0; returns its path."""
    path = Path(output_dir) / "summary.json"
    if is_rank0():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(_jsonable(summary), indent=2, sort_keys=False) + "\n")
    return path


def read_summary(output_dir: str | Path) -> dict:
    path = Path(output_dir) / "summary.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run the stage that writes {Path(output_dir)} first")
    return json.loads(path.read_text())


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A small fixed-width table for end-of-run summaries."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join([line, sep, *body])


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Lay out, write `fig` as a PNG at `path` (parents created) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


# -- run-directory checks, done before a command writes anything ------------------------------

def _entries(folder: Path) -> list[str]:
    from deepspec.guards import LOCK_FILE

    return sorted(p.name for p in folder.iterdir() if p.name != LOCK_FILE) if folder.is_dir() else []


def holds_training_run(folder: Path) -> bool:
    """True when `folder` holds (part of) a `deepspec train` run: checkpoints or metrics."""
    ckpts = folder / "checkpoints"
    return (ckpts.is_dir() and any(ckpts.iterdir())) or (folder / "metrics.jsonl").exists()


def check_train_output(output_dir: str | Path, resume: str, overwrite: bool) -> None:
    """`train` into a folder holding a run continues it (resume=auto|PATH) or replaces it
    (overwrite=true); anything else is refused before the run writes a byte."""
    out = Path(output_dir)
    if overwrite and resume not in ("none", "", None):
        raise ValueError(f"overwrite=true and resume={resume} contradict each other: overwrite starts afresh, "
                         f"resume continues; pass one of them")
    if holds_training_run(out) and resume in ("none", "", None) and not overwrite:
        raise ValueError(f"output_dir={out} already holds a training run ({', '.join(_entries(out)[:6])}); "
                         f"continue it with resume=auto, replace it with overwrite=true (its checkpoints and "
                         f"logs are deleted when the new run starts), or choose another output_dir")


def check_export_output(output_dir: str | Path, draft_dir: Path | None, overwrite: bool) -> None:
    """`export` writes into an empty (or new) folder that is neither the drafter's own folder nor one
    holding it; overwrite=true replaces an earlier export (a folder with deepspec's export config)."""
    out = Path(output_dir).resolve()
    if draft_dir is not None:
        draft = Path(draft_dir).resolve()
        if out == draft or draft.is_relative_to(out) or out.is_relative_to(draft):
            raise ValueError(f"output_dir={output_dir} is (or holds, or lies in) the drafter being exported "
                             f"(draft={draft}): exporting there would overwrite the checkpoint; choose a new "
                             f"folder, e.g. output_dir={draft.parent.parent / 'export'}")
    entries = _entries(out)
    if not entries:
        return
    if not overwrite:
        raise ValueError(f"output_dir={output_dir} is not empty ({', '.join(entries[:6])}); export writes into a "
                         f"new or empty folder so two exports never mix; choose another output_dir, or pass "
                         f"overwrite=true to replace an earlier export there")
    if entries == ["config.yaml"]:
        return  # an export that started (its config recorded) and failed before writing: overwrite replaces it
    if not is_export_dir(out):
        raise ValueError(f"output_dir={output_dir} is not empty and holds no earlier deepspec export "
                         f"(config.json with a 'deepspec' entry): overwrite=true only replaces an export; "
                         f"choose another output_dir")


def is_export_dir(folder: Path) -> bool:
    config = folder / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and ("deepspec" in data or data.get("producer") == "deepspec")


def clear_folder(folder: Path) -> None:
    """Delete everything in `folder` but the lock (overwrite=true, once the new run starts)."""
    import shutil

    for name in _entries(folder):
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def check_stage_input(command: str, input_path: str | None) -> None:
    """Refuse the output of the wrong stage as input=, naming the stage that reads it."""
    if not input_path:
        return
    path = Path(input_path)
    if not path.exists():
        raise FileNotFoundError(f"input={path}: no such file or folder")
    if path.is_file():
        if path.stat().st_size == 0:
            raise ValueError(f"input={path} is an empty file: point input= at the previous stage's output")
        return
    has = {name: (path / name).exists() for name in ("manifest.json", "regenerated.jsonl", "train.jsonl")}
    if command in ("train", "data features") and not (has["manifest.json"] or has["regenerated.jsonl"]):
        if has["train.jsonl"]:
            raise ValueError(f"input={path} is a `deepspec data prompts` folder (prompts only, no target answers): "
                             f"run `deepspec data regenerate input={path} output_dir=R` first and pass input=R")
        raise ValueError(f"input={path} holds neither regenerated.jsonl (a `deepspec data regenerate` output) "
                         f"nor manifest.json (a `deepspec data features` cache): point input= at one of those")
    if command == "data regenerate" and (has["manifest.json"] or has["regenerated.jsonl"]):
        what = "feature cache" if has["manifest.json"] else "regenerate output"
        raise ValueError(f"input={path} is a {what}, not prompts: regenerate reads a `deepspec data prompts` "
                         f"folder (train.jsonl) or a JSONL file of chat rows")


# -- running a command ---------------------------------------------------------------------

def run_command(name: str, func: Callable[[DictConfig], Any], cfg: DictConfig) -> int:
    """Run command `name` (e.g. "data regenerate"): the checks that need no model, the output
    directory's lock, the command itself and its summary.json; returns the exit status (0).

    config.yaml is written when the command reports that its run started (`runs.run_started`), or
    at the end of a command that does not: a command refused by its checks leaves it untouched.
    """
    from deepspec import guards

    guards.accept_changed_weights(cfg.target.accept_changed_weights)
    check_output_dir(cfg.output_dir)
    lock = guards.OutputLock(cfg.output_dir, f"deepspec {name}") if is_rank0() else None
    if lock is not None:
        lock.acquire()
    try:
        preflight(name, cfg)
        defer_config(cfg)
        summary = func(cfg)
        run_started()
        if summary is not None:
            write_summary(cfg.output_dir, summary)
    finally:
        defer_config(None)
        if lock is not None:
            lock.release()
    return 0


def preflight(name: str, cfg: DictConfig) -> None:
    """Run-directory and input checks of each command (no model loaded yet)."""
    if name in ("train", "data features", "data regenerate"):
        check_stage_input(name, cfg.input)
    if name == "train":
        check_train_output(cfg.output_dir, cfg.resume, cfg.overwrite)
    elif name == "export":
        draft_dir = None
        if cfg.format != "hf-target":
            from deepspec.drafters.io import resolve_draft_dir

            draft_dir = resolve_draft_dir(cfg.draft)
        check_export_output(cfg.output_dir, draft_dir, cfg.overwrite)
