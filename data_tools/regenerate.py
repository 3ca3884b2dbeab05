"""`deepspec data regenerate`: replace every assistant turn with the target's own answer (docs/data.md).

The drafter must imitate the target, not the original assistant, so each row keeps its
system/user messages and every assistant reply is generated again, turn by turn, each
conditioned on the regenerated history. Engines (``data_tools.hf_engine``,
``data_tools.openai_engine``) produce ``RowResult`` values; this module owns what is
common: reading the input, row accounting, the resumable journal and the output file.

Input: a ``deepspec data prompts`` folder (``train.jsonl`` then ``heldout.jsonl``; each
row keeps its split) or one JSON Lines file (canonical rows, or any format
``data_tools.prompts.normalise_row`` reads; a row's ``split`` field is kept, default
``train``). ``max_rows`` keeps the first rows in that order.

Accounting: every input row ends as exactly one of ``success`` / ``truncated`` / ``error`` /
``skipped``. ``truncated``: the conversation was regenerated but at least one assistant turn hit
``max_new_tokens`` (or the room left under ``max_seq_len``) before its end-of-turn token;
``meta.regen.finish_reasons`` says which (``length``). Its text trains the drafter, but the
tokenizer supervises no end-of-turn token after a cut turn (the target never chose to stop there).
Skipped reasons: ``bad_json``, ``not_utf8`` (undecodable bytes), the ``normalise_row`` drop
reasons (e.g. ``no_user_turn``), ``prompt_too_long`` (the first prompt leaves no room under
``max_seq_len``). A later turn that no longer fits ends the conversation after the last answered turn
(``meta.regen.turns_dropped``).

Resume: ``output_dir/regen_state.json`` records a fingerprint of the input, the settings
that change answers and the target (its weights fingerprint, for engine=hf); each finished
row is appended (and fsynced) to ``output_dir/journal.jsonl``. A restart with the same
settings skips journalled rows and retries the ``error`` rows (``regen.retry_failed``); a
torn last line (SIGKILL mid-write) is cut off. A run where every row, or more than
``regen.max_error_fraction`` of them, failed exits non-zero with the first error; otherwise
``regenerated.jsonl`` is written atomically at the end, one row per input row in input
order, each with ``status``.
With sampling (temperature > 0) each batch is seeded from ``seed`` and its first row,
so a resumed run draws different (equally valid) samples than an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from tqdm import tqdm

from data_tools.cache import file_sha256
from data_tools.jsonl import NOT_UTF8, atomic_write_text, iter_jsonl, write_jsonl_atomic
from data_tools.prompts import normalise_row

T = TypeVar("T")
R = TypeVar("R")

OUTPUT_FILE = "regenerated.jsonl"
JOURNAL_FILE = "journal.jsonl"
STATE_FILE = "regen_state.json"
STATUSES = ("success", "truncated", "error", "skipped")
TRAINABLE = ("success", "truncated")  # rows whose messages are the regenerated conversation


@dataclass(frozen=True)
class SamplingSettings:
    """Everything that changes the answers (recorded in every row and in the fingerprint)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    thinking: bool = False
    max_turns: int | None = None
    max_seq_len: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"regen.max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"sampling settings out of range: temperature={self.temperature} (>= 0), "
                             f"top_p={self.top_p} (in (0, 1]), top_k={self.top_k} (>= 0)")


@dataclass
class InputRow:
    """One input row: its prompt messages (system/user only, assistant turns removed)."""

    index: int
    id: str
    split: str
    source: str
    messages: list[dict[str, str]]
    meta: dict[str, Any]
    skip_reason: str | None = None

    def segments(self, max_turns: int | None) -> list[list[dict[str, str]]]:
        """The prompt cut after each user message: turn t's prompt is segments[0..t] with
        the regenerated replies in between. Trailing non-user messages are dropped."""
        segments, current = [], []
        for m in self.messages:
            current.append(m)
            if m["role"] == "user":
                segments.append(current)
                current = []
        return segments[:max_turns] if max_turns else segments


@dataclass
class RowResult:
    """What an engine reports for one row."""

    index: int
    status: str  # success | error | skipped (output_row turns a success with a cut turn into truncated)
    messages: list[dict[str, Any]] | None = None  # the regenerated conversation (success)
    reason: str | None = None  # skip reason or error message
    new_tokens: int = 0
    finish_reasons: list[str] = field(default_factory=list)  # per regenerated turn: stop | length
    turns_dropped: int = 0
    # per regenerated turn: the token ids the target generated (end-of-turn token excluded), where the
    # engine knows them; training uses them instead of re-tokenizing the answer's text (data_tools.tokenize)
    token_ids: list[list[int]] = field(default_factory=list)


class Engine(Protocol):
    identity: dict[str, Any]  # engine name, model / target identity

    def generate_rows(self, rows: list[InputRow]) -> Iterator[RowResult]:
        """Yield one result per row, in any order."""
        ...


def in_flight(fn: Callable[[T], R], items: Iterable[T], concurrency: int, name: str) -> Iterator[R]:
    """``fn`` over ``items`` on a thread pool, at most ``concurrency`` calls running and twice that
    submitted; results in completion order (the request engines' one loop)."""
    concurrency = max(1, concurrency)
    queue = iter(items)
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=name) as pool:
        running: set[Future] = set()
        while True:
            for item in itertools.islice(queue, 2 * concurrency - len(running)):
                running.add(pool.submit(fn, item))
            if not running:
                return
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for f in done:
                yield f.result()


def read_input_rows(input_path: str | Path, max_rows: int | None = None) -> tuple[list[InputRow], str]:
    """Input rows in order (capped at ``max_rows``) and a sha256 digest of the input files."""
    path = Path(input_path)
    if path.is_dir():
        files = [(path / "train.jsonl", "train"), (path / "heldout.jsonl", "heldout")]
        if not files[0][0].exists():
            raise FileNotFoundError(f"input={path} holds no train.jsonl: give a `deepspec data prompts` "
                                    f"output folder or a JSONL file of chat rows")
        files = [(f, s) for f, s in files if f.exists()]
    elif path.is_file():
        files = [(path, None)]
    else:
        raise FileNotFoundError(f"input={path}: no such file or folder (run `deepspec data prompts` first)")
    digest = hashlib.sha256()
    rows: list[InputRow] = []
    for file, split in files:
        digest.update(file_sha256(file).encode())
        for line_no, obj in iter_jsonl(file, on_error="yield"):
            if max_rows is not None and len(rows) >= max_rows:
                break
            rows.append(_input_row(len(rows), obj, split, file, line_no))
    return rows, digest.hexdigest()[:16]


def _input_row(index: int, obj: Any, split: str | None, file: Path, line_no: int) -> InputRow:
    fallback_id = f"{file.stem}:{line_no}"
    if not isinstance(obj, dict):  # JsonLineError or not an object
        reason = "not_an_object" if not hasattr(obj, "line_no") else \
            "not_utf8" if obj.message.startswith(NOT_UTF8) else "bad_json"
        return InputRow(index, fallback_id, split or "train", file.stem, [], {}, reason)
    split = split or str(obj.get("split", "train"))
    canonical = isinstance(obj.get("id"), str) and isinstance(obj.get("messages"), list) and all(
        isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
        and isinstance(m.get("content"), str) for m in obj["messages"])
    if canonical:
        row, reason = obj, None
    else:
        row, reason = normalise_row(obj, file.stem, line_no - 1)
        if row is None:
            return InputRow(index, fallback_id, split, file.stem, [], {}, reason)
    prompt = [{"role": m["role"], "content": m["content"]} for m in row["messages"] if m["role"] != "assistant"]
    skip = None if any(m["role"] == "user" for m in prompt) else "no_user_turn"
    return InputRow(index, row["id"], split, str(row.get("source", file.stem)), prompt,
                    dict(row.get("meta") or {}), skip)


def open_run_state(folder: Path, fingerprint: dict[str, Any], provenance: dict[str, Any] | None = None) -> None:
    """A resumable run's state file in ``folder``: refuse a run whose fingerprint differs from the
    recorded one (naming what changed), else create the folder and record it the first time."""
    state_path = folder / STATE_FILE
    if state_path.exists():
        _check_fingerprint(folder, json.loads(state_path.read_text()), fingerprint)
    folder.mkdir(parents=True, exist_ok=True)
    if not state_path.exists():
        state = {"fingerprint": fingerprint, **({"provenance": provenance} if provenance else {})}
        atomic_write_text(state_path, json.dumps(state, indent=2) + "\n")


class Journal:
    """Append-only record of finished rows in ``output_dir`` (see module docstring).

    A row journalled more than once (an error retried by a later run) counts as its last entry.
    """

    def __init__(self, output_dir: Path, fingerprint: dict[str, Any], provenance: dict[str, Any] | None = None):
        self.dir = Path(output_dir)
        open_run_state(self.dir, fingerprint, provenance)
        self.path = self.dir / JOURNAL_FILE
        self.done: dict[int, dict[str, Any]] = {}
        if self.path.exists():
            _cut_torn_tail(self.path)
            for _, row in iter_jsonl(self.path):
                self.done[int(row["index"])] = row
        self._file = open(self.path, "a", encoding="utf-8")

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
            self.done[int(row["index"])] = row
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _check_fingerprint(folder: Path, state: dict[str, Any], fingerprint: dict[str, Any]) -> None:
    """Refuse to resume a run recorded with other input, settings or target weights."""
    from deepspec.guards import accept_changed_weights, weights_mismatch

    old = state["fingerprint"]
    old_engine, new_engine = dict(old.get("engine") or {}), dict(fingerprint.get("engine") or {})
    if new_engine.get("engine") == "hf" and old_engine.get("weights") != new_engine.get("weights"):
        recorded = {**old_engine, "source": (state.get("provenance") or {}).get("target_source")}
        problem = weights_mismatch(f"the regeneration journal in {folder}", recorded, new_engine)
        if problem:
            raise ValueError(problem + " (or choose another output_dir)")
    if accept_changed_weights():
        old_engine.pop("weights", None)
        new_engine.pop("weights", None)
    old, new = {**old, "engine": old_engine}, {**fingerprint, "engine": new_engine}
    if old != new:
        diff = {k: (old.get(k), new.get(k)) for k in set(old) | set(new) if old.get(k) != new.get(k)}
        raise ValueError(f"{folder} holds a regeneration run with other settings "
                         f"(key: (old, new)) {diff}; rerun with the old settings to resume, or "
                         f"delete {folder} / choose another output_dir to start afresh")


def _cut_torn_tail(path: Path) -> None:
    """Drop a last line without its newline (a write cut short by a kill)."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def output_row(row: InputRow, result: RowResult, regen_meta: dict[str, Any]) -> dict[str, Any]:
    """The output row for one input row (the regenerated conversation on success)."""
    meta = dict(row.meta)
    meta["regen"] = dict(regen_meta, new_tokens=result.new_tokens, finish_reasons=result.finish_reasons,
                         turns_dropped=result.turns_dropped)
    if any(result.token_ids) and result.status == "success":
        meta["regen"]["answer_token_ids"] = result.token_ids
    status = result.status
    if status == "success" and "length" in result.finish_reasons:
        status = "truncated"
    out = {"index": row.index, "id": row.id, "split": row.split, "source": row.source,
           "status": status, "messages": result.messages if status in TRAINABLE else row.messages,
           "meta": meta}
    if result.reason is not None:
        out["reason" if result.status == "skipped" else "error"] = result.reason
    return out


def run_regeneration(input_path: str | Path, output_dir: str | Path, engine: Engine, settings: SamplingSettings,
                     max_rows: int | None = None, progress: bool = True, retry_failed: bool = True,
                     max_error_fraction: float = 0.1, provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Regenerate every row of ``input_path`` into ``output_dir``; returns the summary.

    ``retry_failed``: rows journalled as ``error`` by an earlier run are regenerated again.
    When every row this run regenerated failed, or more than ``max_error_fraction`` of them, a
    RuntimeError naming the first error is raised and ``regenerated.jsonl`` is not written; the
    journal keeps the successes for the next run.
    ``provenance`` (e.g. the target's source) is recorded in regen_state.json, never compared.
    """
    from deepspec.runs import run_started

    if not 0 <= max_error_fraction <= 1:
        raise ValueError(f"regen.max_error_fraction={max_error_fraction}: choose a fraction in [0, 1]")
    t0 = time.perf_counter()
    output_dir = Path(output_dir)
    rows, digest = read_input_rows(input_path, max_rows)
    _check_rows(input_path, rows)
    fingerprint = {"input_sha256": digest, "engine": engine.identity, "sampling": asdict(settings)}
    regen_meta = {"engine": engine.identity.get("engine"), "model": engine.identity.get("name"),
                  **asdict(settings)}
    journal = Journal(output_dir, fingerprint, provenance)
    run_started()

    def settled(r: InputRow) -> bool:
        done = journal.done.get(r.index)
        return done is not None and not (retry_failed and done["status"] == "error")

    resumed = sum(1 for r in rows if settled(r))
    retried = sum(1 for r in rows if r.index in journal.done and not settled(r))
    by_index = {r.index: r for r in rows}
    attempted = failed = 0
    first_error = None
    try:
        journal.append(output_row(r, RowResult(r.index, "skipped", reason=r.skip_reason), regen_meta)
                       for r in rows if r.skip_reason and not settled(r))
        todo = [r for r in rows if not settled(r)]
        new_tokens = 0
        bar = tqdm(total=len(todo), desc="regenerate", unit=" rows", disable=not progress)
        for result in engine.generate_rows(todo):
            journal.append([output_row(by_index[result.index], result, regen_meta)])
            attempted += 1
            if result.status == "error":
                failed += 1
                first_error = first_error or f"row {by_index[result.index].id}: {result.reason}"
            new_tokens += result.new_tokens
            bar.update(1)
            bar.set_postfix(tok_s=f"{new_tokens / max(bar.format_dict['elapsed'], 1e-9):.1f}")
        bar.close()
    finally:
        journal.close()
    missing = [r.index for r in rows if r.index not in journal.done]
    if missing:
        raise RuntimeError(f"engine {engine.identity.get('engine')} returned no result for rows {missing[:10]} "
                           f"({len(missing)} rows): rerun the same command to resume them")
    if failed and (failed == attempted or failed > max_error_fraction * attempted):
        raise RuntimeError(f"{failed} of the {attempted} rows regenerated by this run failed (allowed: fewer than "
                           f"all and at most regen.max_error_fraction={max_error_fraction}); first error: "
                           f"{first_error}. The {attempted - failed} successes are kept in {journal.path}: fix the "
                           f"cause (server down? wrong regen.urls or model?) and rerun the same command, which "
                           f"retries the failed rows (regen.retry_failed=true)")
    final = [journal.done[r.index] for r in rows]
    write_jsonl_atomic(output_dir / OUTPUT_FILE, final)
    summary = _summary(rows, final, resumed, new_tokens, time.perf_counter() - t0, fingerprint, output_dir)
    summary["input"] = str(input_path)
    summary["retried_rows"] = retried
    return summary


def _check_rows(input_path: str | Path, rows: list[InputRow]) -> None:
    """Refuse an input with no row to regenerate, saying why its rows were skipped."""
    if not rows:
        raise ValueError(f"input={input_path} holds no rows (empty file?): point it at a `deepspec data prompts` "
                         f"folder or a JSONL file of chat rows")
    if all(r.skip_reason for r in rows):
        reasons = Counter(r.skip_reason for r in rows)
        raise ValueError(f"input={input_path}: none of its {len(rows)} rows can be regenerated ({dict(reasons)}); "
                         f"expected one JSON object per line with `messages` (role/content) or ShareGPT "
                         f"`conversations`, UTF-8 encoded")


def _summary(rows: list[InputRow], final: list[dict[str, Any]], resumed: int, new_tokens: int, elapsed: float,
             fingerprint: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    status = Counter(r["status"] for r in final)
    unknown = set(status) - set(STATUSES)
    total = sum(status[s] for s in STATUSES)
    if unknown or total != len(rows) or len(final) != len(rows):
        raise RuntimeError(f"row accounting failed in {output_dir}: {len(rows)} input rows but "
                           f"{dict(status)} results; delete {output_dir / JOURNAL_FILE} and rerun")
    skipped = Counter(r.get("reason", "?") for r in final if r["status"] == "skipped")
    errors = [{"id": r["id"], "error": r.get("error")} for r in final if r["status"] == "error"][:10]
    splits = Counter(r["split"] for r in final if r["status"] in TRAINABLE)
    return {"input_rows": len(rows), "success": status["success"], "truncated": status["truncated"],
            "error": status["error"], "skipped": status["skipped"], "skipped_by_reason": dict(skipped),
            "error_samples": errors,
            "resumed_rows": resumed, "new_tokens": new_tokens, "elapsed_s": round(elapsed, 2),
            "tokens_per_s": round(new_tokens / elapsed, 2) if elapsed > 0 else None,
            "trainable_by_split": dict(splits), "engine": fingerprint["engine"],
            "sampling": fingerprint["sampling"], "output": str(output_dir / OUTPUT_FILE)}


def format_summary(summary: dict[str, Any]) -> str:
    s = summary
    lines = [f"rows {s['input_rows']}: success {s['success']}, truncated {s['truncated']}, "
             f"error {s['error']}, skipped {s['skipped']} {s['skipped_by_reason'] or ''} "
             f"(resumed {s['resumed_rows']})",
             f"new tokens {s['new_tokens']} in {s['elapsed_s']} s ({s['tokens_per_s']} tok/s)",
             f"output: {s['output']}"]
    lines += [f"error {e['id']}: {e['error']}" for e in s["error_samples"][:3]]
    return "\n".join(lines)
