"""`deepspec data prompts`: turn chat datasets into canonical prompt rows (docs/data.md).

Reads every source (see ``data_tools.sources``), normalises each row, drops
malformed rows with a count per reason, de-duplicates, mixes sources by weight,
caps the row count and splits train/held-out deterministically. Writes
``train.jsonl``, ``heldout.jsonl`` and ``summary.json`` into the output folder.

Canonical row (one JSON object per line)::

    {"id": "sharegpt:3f2a...", "source": "sharegpt",
     "messages": [{"role": "system|user|assistant", "content": "..."}, ...],
     "meta": {"index": 12, ...other top-level fields of the input row...}}

Contract for the regeneration step: the prompt is the sequence of system/user
messages; every user message gets exactly one assistant reply, in order (an
existing assistant message is the original reply and is replaced). Hence:

- ``{"turns": [...]}`` rows become consecutive user messages (multi-turn prompts
  whose replies do not exist yet);
- in ``conversations`` / ``messages`` rows, consecutive messages with the same role
  are merged into one (joined by a blank line) so that each user message stands
  for one exchange; counted in ``summary["fixes"]["merged_same_role"]``;
- assistant messages before the first user message (ShareGPT conversations split
  mid-way start with ``gpt``) have no prompt and are removed; counted in
  ``summary["fixes"]["leading_assistant_removed"]``;
- a conversation may end with a user message (its reply is generated).

Drop reasons: ``bad_json`` (a JSONL line that does not parse; samples keep the
line number), ``not_an_object``, ``no_messages``, ``bad_message`` (a message that is
not an object, or has no role/content text), ``unknown_role``, ``empty_content``
(any message blank), ``no_user_turn``, ``duplicate`` (same system/user text as an
earlier row, across all sources, first wins), ``not_selected`` (beyond
``max_rows`` or beyond a source's share under ``weights``).
Always ``rows_read == rows_kept + sum(dropped.values())``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from fractions import Fraction
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_tools.jsonl import atomic_write_text, write_jsonl_atomic
from data_tools.sources import ReadReport, read_source, source_name

ROLE_MAP = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
}
MAX_ERROR_SAMPLES = 20

Row = dict[str, Any]


def normalise_row(raw: Any, source: str, index: int) -> tuple[Row | None, str | None]:
    """Canonical row for one input row, or ``(None, reason)`` if it is dropped.

    Accepts ShareGPT (``conversations`` of ``from``/``value``), OpenAI ``messages``
    (``role``/``content``; content may be a list of text parts), ``turns`` (a list of
    user strings) and GSM8K-style ``question`` rows (a single user turn; the other
    fields, e.g. ``answer``, stay in ``meta``).
    """
    if not isinstance(raw, dict):
        return None, "not_an_object"
    if "conversations" in raw:
        key, items, turns = "conversations", raw["conversations"], False
    elif "messages" in raw:
        key, items, turns = "messages", raw["messages"], False
    elif "turns" in raw:
        key, items, turns = "turns", raw["turns"], True
    elif "question" in raw:
        key, items, turns = "question", [raw["question"]], True
    else:
        return None, "no_messages"
    if not isinstance(items, list) or not items:
        return None, "no_messages"

    messages: list[dict[str, str]] = []
    for item in items:
        if turns and isinstance(item, str):
            role, content = "user", item
        elif isinstance(item, dict):
            role_raw = item.get("from", item.get("role"))
            content = _text(item.get("value", item.get("content")))
            if not isinstance(role_raw, str) or content is None:
                return None, "bad_message"
            role = ROLE_MAP.get(role_raw.strip().lower())
            if role is None:
                return None, "unknown_role"
        else:
            return None, "bad_message"
        if not content.strip():
            return None, "empty_content"
        messages.append({"role": role, "content": content})

    meta: dict[str, Any] = {"index": index}
    meta.update({k: v for k, v in raw.items() if k != key and _json_native(v)})
    if not turns:
        messages, removed = _drop_leading_assistant(messages)
        messages, merged = _merge_same_role(messages)
        if removed:
            meta["leading_assistant_removed"] = removed
        if merged:
            meta["merged_same_role"] = merged
    if not any(m["role"] == "user" for m in messages):
        return None, "no_user_turn"
    return {
        "id": f"{source}:{prompt_key(messages)[:16]}",
        "source": source,
        "messages": messages,
        "meta": meta,
    }, None


def prompt_key(messages: list[dict[str, str]]) -> str:
    """Hash of the system/user text (whitespace-collapsed): the de-duplication key."""
    prompt = [[m["role"], " ".join(m["content"].split())] for m in messages if m["role"] != "assistant"]
    return hashlib.blake2b(json.dumps(prompt, ensure_ascii=False).encode(), digest_size=16).hexdigest()


def content_key(row_id: str) -> str:
    """The prompt-hash part of a row id (the id minus its ``source:`` prefix)."""
    return row_id.rsplit(":", 1)[1]


def _text(content: Any) -> str | None:
    """Message text: a string, or the joined ``text`` of OpenAI content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    return None


def _json_native(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool, list, dict)) or value is None


def _drop_leading_assistant(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], int]:
    """Remove assistant messages that come before the first user message."""
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), len(messages))
    kept = [m for i, m in enumerate(messages) if i > first_user or m["role"] != "assistant"]
    return kept, len(messages) - len(kept)


def _merge_same_role(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], int]:
    """Join consecutive messages with the same role (blank line between)."""
    merged: list[dict[str, str]] = []
    for m in messages:
        if merged and merged[-1]["role"] == m["role"]:
            merged[-1] = {"role": m["role"], "content": merged[-1]["content"] + "\n\n" + m["content"]}
        else:
            merged.append(dict(m))
    return merged, len(messages) - len(merged)


def unit_hash(seed: int, purpose: str, row_id: str) -> float:
    """Deterministic number in [0, 1) from (seed, purpose, id); independent per row."""
    digest = hashlib.blake2b(f"{seed}:{purpose}:{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def is_heldout(row_id: str, heldout_fraction: float, seed: int) -> bool:
    """Held-out membership depends only on (id, seed, fraction): stable when rows are added."""
    return unit_hash(seed, "heldout", row_id) < heldout_fraction


def mix_counts(available: list[int], weights: list[float] | None, max_rows: int | None) -> list[int]:
    """Rows to take from each source.

    With ``weights`` the counts are proportional to them (exactly, up to rounding),
    and the total is the largest every source can supply at those proportions,
    capped by ``max_rows``: a source with too few rows limits the whole mix rather
    than being silently under-represented. Without ``weights`` the proportions are
    the available counts (every row, or a proportional cut to ``max_rows``).
    """
    shares = [Fraction(w) for w in (weights if weights is not None else available)]
    total_share = sum(shares)
    if total_share == 0:
        return [0] * len(available)
    props = [s / total_share for s in shares]
    total = min(math.floor(n / p) for n, p in zip(available, props, strict=True) if p > 0)
    if max_rows is not None:
        total = min(total, max_rows)
    exact = [total * p for p in props]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def select_rows(rows: list[Row], count: int, seed: int) -> list[Row]:
    """``count`` rows chosen by a seeded hash of their id, returned in input order."""
    if count >= len(rows):
        return list(rows)
    ranked = sorted(range(len(rows)), key=lambda i: unit_hash(seed, "sample", rows[i]["id"]))
    return [rows[i] for i in sorted(ranked[:count])]


def _validate(
    sources: list[str], weights: list[float] | None, max_rows: int | None, heldout_fraction: float
) -> None:
    if not sources:
        raise ValueError("no prompt sources given; e.g. data.sources=[sharegpt]")
    if len(set(sources)) != len(sources):
        raise ValueError(f"prompt sources {sources} name the same source twice")
    if weights is not None:
        if len(weights) != len(sources):
            raise ValueError(
                f"{len(weights)} weights {weights} for {len(sources)} sources {sources}; give one per source"
            )
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"weights {weights} must be >= 0 with a positive sum")
    if max_rows is not None and max_rows < 0:
        raise ValueError(f"max_rows={max_rows} must be >= 0 (or None for no cap)")
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction={heldout_fraction} must be in [0, 1)")


def _prompt_chars(row: Row) -> int:
    return sum(len(m["content"]) for m in row["messages"] if m["role"] != "assistant")


def prepare_prompts(
    sources: list[str],
    weights: list[float] | None,
    max_rows: int | None,
    heldout_fraction: float,
    seed: int,
    output_dir: Path,
    progress: bool = True,
    max_prompt_chars: int | None = None,
) -> dict[str, Any]:
    """Read, normalise, de-duplicate, mix, cap and split; write the output files.

    ``max_prompt_chars`` drops rows whose system + user text is longer (reason
    ``prompt_too_long``): a cheap, tokenizer-free way to keep CPU runs to short contexts.

    Writes ``output_dir/train.jsonl``, ``heldout.jsonl`` and ``summary.json``
    (each atomically) and returns the summary dict (see the module docstring).
    """
    _validate(sources, weights, max_rows, heldout_fraction)
    output_dir = Path(output_dir)
    dropped: Counter[str] = Counter()
    fixes: Counter[str] = Counter()
    seen: set[str] = set()
    bad_json_samples: list[dict[str, Any]] = []
    per_source: dict[str, dict[str, Any]] = {}
    truncated: dict[str, Any] = {}
    valid: list[list[Row]] = []

    for spec in sources:
        name = source_name(spec)
        report = ReadReport(spec)
        stats = {"spec": spec, "rows_read": 0, "dropped": Counter()}
        kept: list[Row] = []
        bar = tqdm(desc=f"prompts {name}", unit=" rows", disable=not progress)
        for raw in read_source(spec, report):
            bar.update(1)
            stats["rows_read"] += 1
            if raw.error is not None:
                row, reason = None, "bad_json"
                if len(bad_json_samples) < MAX_ERROR_SAMPLES:
                    bad_json_samples.append({"source": name, "line": raw.line, "error": raw.error})
            else:
                row, reason = normalise_row(raw.value, name, raw.index)
            if row is not None and content_key(row["id"]) in seen:
                row, reason = None, "duplicate"
            if row is not None and max_prompt_chars is not None and _prompt_chars(row) > max_prompt_chars:
                row, reason = None, "prompt_too_long"
            if row is None:
                stats["dropped"][reason] += 1
                continue
            seen.add(content_key(row["id"]))
            fixes.update(
                {k: 1 for k in ("merged_same_role", "leading_assistant_removed") if k in row["meta"]}
            )
            kept.append(row)
        bar.close()
        stats["path"] = report.path
        stats["rows_valid"] = len(kept)
        if report.truncated:
            truncated[name] = report.truncated
        per_source[name] = stats
        valid.append(kept)

    empty = {n: s for n, s in per_source.items() if s["rows_valid"] == 0}
    if empty:
        detail = "; ".join(f"{s['path']}: {s['rows_read']} rows read, dropped {dict(s['dropped']) or 'none'}"
                           for s in empty.values())
        raise ValueError(f"no usable prompt in {', '.join(empty)} ({detail}): a source must hold JSON Lines or a "
                         f"JSON array of chat rows (messages or ShareGPT conversations) in UTF-8; fix or remove it")
    counts = mix_counts([len(v) for v in valid], weights, max_rows)
    train: list[Row] = []
    heldout: list[Row] = []
    for stats, rows, count, weight in zip(
        per_source.values(), valid, counts, weights or [None] * len(sources), strict=True
    ):
        chosen = select_rows(rows, count, seed)
        if len(rows) > count:
            stats["dropped"]["not_selected"] += len(rows) - count
        split = [is_heldout(r["id"], heldout_fraction, seed) for r in chosen]
        for row, held in zip(chosen, split, strict=True):
            (heldout if held else train).append(row)
        stats.update(
            weight=weight,
            rows_kept=count,
            rows_heldout=sum(split),
            rows_train=count - sum(split),
            dropped=dict(stats["dropped"]),
        )
        dropped.update(stats["dropped"])

    write_jsonl_atomic(output_dir / "train.jsonl", train)
    write_jsonl_atomic(output_dir / "heldout.jsonl", heldout)
    summary = {
        "rows_read": sum(s["rows_read"] for s in per_source.values()),
        "rows_kept": len(train) + len(heldout),
        "rows_train": len(train),
        "rows_heldout": len(heldout),
        "dropped": dict(sorted(dropped.items())),
        "fixes": dict(sorted(fixes.items())),
        "per_source": per_source,
        "truncated": truncated,
        "bad_json_samples": bad_json_samples,
        "settings": {
            "sources": list(sources),
            "weights": None if weights is None else [float(w) for w in weights],
            "max_rows": max_rows,
            "heldout_fraction": heldout_fraction,
            "seed": seed,
        },
        "files": {"train": str(output_dir / "train.jsonl"), "heldout": str(output_dir / "heldout.jsonl")},
    }
    atomic_write_text(output_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A short plain-text table of a ``prepare_prompts`` summary, for the terminal."""
    lines = [f"{'source':<24}{'read':>9}{'kept':>9}{'train':>9}{'heldout':>9}  dropped"]
    for name, s in summary["per_source"].items():
        drops = ", ".join(f"{k} {v}" for k, v in sorted(s["dropped"].items())) or "-"
        lines.append(
            f"{name:<24}{s['rows_read']:>9}{s['rows_kept']:>9}{s['rows_train']:>9}"
            f"{s['rows_heldout']:>9}  {drops}"
        )
    drops = ", ".join(f"{k} {v}" for k, v in summary["dropped"].items()) or "-"
    lines.append(
        f"{'total':<24}{summary['rows_read']:>9}{summary['rows_kept']:>9}"
        f"{summary['rows_train']:>9}{summary['rows_heldout']:>9}  {drops}"
    )
    for name, t in summary["truncated"].items():
        lines.append(
            f"{name}: truncated file, {t['records_recovered']} complete records recovered,"
            f" {t['partial_records_dropped']} partial record dropped, {t['bytes_lost']} bytes lost"
        )
    if summary["fixes"]:
        lines.append("fixes: " + ", ".join(f"{k} in {v} rows" for k, v in summary["fixes"].items()))
    return "\n".join(lines)
