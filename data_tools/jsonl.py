"""Small JSON/JSONL helpers shared by the data tools.

- ``atomic_write_text`` (``deepspec.atomic``) / ``write_jsonl_atomic``: write to a temporary
  file in the same directory, fsync, then ``os.replace`` -- a reader never sees half a file
  and an interrupted run leaves the previous file intact.
- ``iter_jsonl``: streaming JSONL reader that reports (line number, object) and
  lets the caller decide what a bad line means.
- ``iter_json_array``: streaming reader for a top-level JSON array that never
  holds the whole file in memory and survives a file truncated mid-record: it
  yields every complete element and fills an ``ArrayReadReport`` saying what was
  lost (bytes, partial element) instead of raising like ``json.load`` does.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from deepspec.atomic import atomic_write_text, atomic_write_via  # noqa: F401  (re-exported)

_WHITESPACE = " \t\n\r"
NOT_UTF8 = "not valid UTF-8"


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[Any]) -> int:
    """Write one JSON document per line to ``path`` atomically; returns the row count.

    ``rows`` is consumed lazily, so a generator of any length can be written.
    """
    count = 0

    def write(f) -> None:
        nonlocal count
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False))
            f.write("\n")
            count += 1

    atomic_write_via(path, write)
    return count


@dataclass(frozen=True)
class JsonLineError:
    """A JSONL line that did not parse: where, why, and the start of the text."""

    path: str
    line_no: int
    message: str
    text_head: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line_no}: {self.message} (line starts {self.text_head!r})"


OnError = Literal["raise", "yield", "skip"]


def iter_jsonl(
    path: str | os.PathLike, on_error: OnError = "raise"
) -> Iterator[tuple[int, Any | JsonLineError]]:
    """Yield ``(line_no, obj)`` for each non-blank line of a JSONL file (1-based).

    ``on_error`` decides what a line that is not valid JSON (or not UTF-8) does: ``"raise"`` raises
    ``ValueError`` naming file and line, ``"yield"`` yields ``(line_no, JsonLineError)``,
    ``"skip"`` ignores it.
    """
    if on_error not in ("raise", "yield", "skip"):
        raise ValueError(f"on_error must be 'raise', 'yield' or 'skip', got {on_error!r}")
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                text = raw.decode("utf-8", "replace")
                message = exc.msg if isinstance(exc, json.JSONDecodeError) else \
                    f"{NOT_UTF8} (byte {exc.start} of the line)"
                err = JsonLineError(str(path), line_no, message, text[:80])
                if on_error == "raise":
                    raise ValueError(f"{err}; fix or remove the line") from exc
                if on_error == "yield":
                    yield line_no, err
                continue
            yield line_no, obj


@dataclass
class ArrayReadReport:
    """What ``iter_json_array`` found; filled in while (and after) it iterates."""

    path: str = ""
    bytes_total: int = 0
    elements: int = 0
    complete: bool = False  # saw the closing ']' of the array
    truncated: bool = False  # file ended before the closing ']'
    bytes_lost: int = 0  # bytes after the last complete element that were not JSON we could use
    lost_from_offset: int | None = None  # byte offset where the unusable tail starts
    partial_elements: int = 0  # an element cut off by the end of the file (0 or 1)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "bytes_total": self.bytes_total,
            "records_recovered": self.elements,
            "bytes_lost": self.bytes_lost,
            "lost_from_offset": self.lost_from_offset,
            "partial_records_dropped": self.partial_elements,
            "notes": list(self.notes),
        }


def iter_json_array(
    path: str | os.PathLike,
    report: ArrayReadReport | None = None,
    chunk_bytes: int = 1 << 22,
    on_bytes: Callable[[int], None] | None = None,
) -> Iterator[Any]:
    """Stream the elements of a top-level JSON array in ``path``.

    Reads ``chunk_bytes`` at a time and decodes one element at a time with
    ``json.JSONDecoder.raw_decode``, so memory stays around one chunk plus the
    largest element. A file that ends mid-element (or without the closing ``]``) is
    not an error: every complete element is yielded and ``report`` records the lost
    tail. A syntax error in the middle of the file raises ``ValueError`` with the
    byte offset. ``on_bytes(n)`` is called with the number of bytes read per chunk
    (for progress bars).
    """
    report = report if report is not None else ArrayReadReport()
    report.path = str(path)
    report.bytes_total = os.path.getsize(path)
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    buf = ""
    pos = 0
    consumed_bytes = 0  # bytes of the file before buf[0]
    eof = False

    with open(path, "rb") as f:

        def fill() -> bool:
            """Append at least one more chunk to ``buf``; False at end of file."""
            nonlocal buf, pos, consumed_bytes, eof
            if eof:
                return False
            done = buf[:pos]
            consumed_bytes += len(done.encode("utf-8"))
            buf = buf[pos:]
            pos = 0
            # Grow the read with the pending text so one huge element is not re-parsed
            # once per small chunk (keeps the cost linear).
            data = f.read(max(chunk_bytes, len(buf)))
            if on_bytes is not None and data:
                on_bytes(len(data))
            if not data:
                eof = True
                return False
            buf += utf8.decode(data)
            return True

        def skip_ws() -> bool:
            """Move ``pos`` to the next non-blank char; False if the file ends first."""
            nonlocal pos
            while True:
                n = len(buf)
                while pos < n and buf[pos] in _WHITESPACE:
                    pos += 1
                if pos < n:
                    return True
                if not fill():
                    return False

        if not skip_ws():
            raise ValueError(f"{path}: file is empty; expected a JSON array")
        if buf[pos] != "[":
            raise ValueError(
                f"{path}: expected a JSON array starting with '[', found {buf[pos]!r}; "
                "if this is JSON Lines (one object per line) read it with iter_jsonl"
            )
        pos += 1
        expect_value = True  # after '[' or ','
        first = True
        while True:
            if not skip_ws():
                _mark_truncated(report, consumed_bytes, buf, pos, partial=False)
                return
            ch = buf[pos]
            if ch == "]" and (first or not expect_value):
                report.complete = True
                return
            if not expect_value:
                if ch != ",":
                    raise ValueError(
                        f"{path}: expected ',' or ']' at byte {_offset(consumed_bytes, buf, pos)},"
                        f" found {ch!r}; the file is not a valid JSON array"
                    )
                pos += 1
                expect_value = True
                continue
            try:
                value, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as exc:
                if _ends_early(exc, buf):
                    if fill():
                        continue
                    _mark_truncated(report, consumed_bytes, buf, pos, partial=True)
                    return
                raise ValueError(
                    f"{path}: invalid JSON at byte {_offset(consumed_bytes, buf, exc.pos)}"
                    f" ({exc.msg}) inside element {report.elements}; the file is corrupt"
                    " mid-array, not just truncated"
                ) from exc
            # A number or literal at the very end of the text may continue in the next
            # chunk; at the end of the file it may have been cut, so it counts as partial.
            if end == len(buf) and not isinstance(value, (dict, list, str)):
                if fill():
                    continue
                _mark_truncated(report, consumed_bytes, buf, pos, partial=True)
                return
            pos = end
            report.elements += 1
            first = False
            expect_value = False
            yield value


def _ends_early(exc: json.JSONDecodeError, buf: str) -> bool:
    """True if the decode error can be explained by the text simply stopping early.

    An unterminated string, or an error within the last few characters that is
    not a stray closing bracket (a literal, number or escape cut in half).
    """
    if exc.msg.startswith("Unterminated string"):
        return True
    tail = buf[exc.pos :].rstrip()
    return tail == "" or (len(tail) <= 16 and tail[0] not in "]},:")


def _offset(consumed_bytes: int, buf: str, pos: int) -> int:
    return consumed_bytes + len(buf[:pos].encode("utf-8"))


def _mark_truncated(report: ArrayReadReport, consumed_bytes: int, buf: str, pos: int, partial: bool) -> None:
    report.truncated = True
    start = _offset(consumed_bytes, buf, pos)
    report.lost_from_offset = start
    report.bytes_lost = report.bytes_total - start
    report.partial_elements = 1 if partial else 0
    if partial:
        report.notes.append(
            f"file ends inside element {report.elements}: dropped 1 partial record"
            f" ({report.bytes_lost} bytes from byte {start})"
        )
    else:
        report.notes.append("file ends without the closing ']' after a complete record")
