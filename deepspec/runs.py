"""Run directories, summaries and rank-0 console output shared by every command."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

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
    """Create `cfg.output_dir` and record the composed config in it (rank 0 writes)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if is_rank0():
        atomic_write(out / "config.yaml", OmegaConf.to_yaml(cfg))
    return out


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
