"""Benchmark prompts: the shipped JSONL files (this package directory) or any `{"turns": [...]}` JSONL.

Each row is one conversation: `turns` holds the user messages in order (mt-bench has two).
Shipped: gsm8k, math500, humaneval, mbpp, mt-bench, aime24 (MIT, from DeepSpec's eval set;
see LICENSE.DeepSpec beside them) and instruct (64 general instruction-following prompts with
formatting constraints, IFEval-style, written for deepspec; Apache-2.0, see LICENSE.instruct).
Kinds, so a report can say which kind of request a figure is for: maths (gsm8k, math500,
aime24), code (humaneval, mbpp), chat (mt-bench, instruct).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SHIPPED_DIR = Path(__file__).resolve().parent
KINDS = {"gsm8k": "maths", "math500": "maths", "aime24": "maths", "humaneval": "code", "mbpp": "code",
         "mt-bench": "chat", "instruct": "chat"}


@dataclass
class Benchmark:
    name: str
    path: Path
    conversations: list[list[str]]  # user turns per conversation

    @property
    def num_turns(self) -> int:
        return sum(len(c) for c in self.conversations)


def shipped_benchmarks() -> list[str]:
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.jsonl"))


def benchmark_path(name_or_path: str) -> Path:
    """A shipped benchmark's file, or `name_or_path` itself when it is an existing file."""
    shipped = SHIPPED_DIR / f"{name_or_path}.jsonl"
    if shipped.is_file():
        return shipped
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    raise FileNotFoundError(f"eval.benchmarks: {name_or_path!r} is neither a shipped benchmark "
                            f"({', '.join(shipped_benchmarks())}) nor an existing JSONL file")


def load_benchmark(name_or_path: str, max_prompts: int | None = None) -> Benchmark:
    """Read the first `max_prompts` conversations (None or <= 0: all); rows must hold non-empty `turns`."""
    path = benchmark_path(name_or_path)
    conversations: list[list[str]] = []
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({exc.msg}); each line must be "
                                 f'{{"turns": ["user message", ...]}}') from None
            turns = row.get("turns") if isinstance(row, dict) else None
            if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t for t in turns):
                raise ValueError(f"{path}:{line_no}: expected a non-empty list of strings under 'turns', "
                                 f"got {str(row)[:120]}")
            conversations.append(turns)
            if max_prompts and max_prompts > 0 and len(conversations) >= max_prompts:
                break
    if not conversations:
        raise ValueError(f"{path}: no conversations found")
    name = path.stem if path.parent == SHIPPED_DIR else name_or_path
    return Benchmark(name=name, path=path, conversations=conversations)
