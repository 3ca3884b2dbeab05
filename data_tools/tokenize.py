"""Chat rendering with a loss mask over the assistant's own tokens (docs/data.md).

The conversation is rendered once with the target's chat template and tokenized with
character offsets. For assistant message i the supervised character span is:

- start: the end of the generation prompt, i.e. ``len(render(messages[:i],
  add_generation_prompt=True))`` when that text is a prefix of the full rendering (so
  the role header, and an empty ``<think></think>`` a template inserts when thinking is
  off, are prompt, not target output); otherwise where the content is found;
- end: the end of the message content (``reasoning_content`` is rendered by the template
  and falls inside the span), found by searching the text from ``start``; a template
  that drops a historic turn's ``<think>`` block is handled by searching for the part
  after ``</think>``.

A token is supervised when its first character lies in [start, end), plus the first
token at or after ``end`` when it is a special token (the end-of-turn token:
``<|im_end|>``, ``<|eot_id|>``, ...) -- except after a turn the target did not finish (a
regenerated turn cut at the length limit: the template closes it, the target never chose to).
The newline a template puts after the end-of-turn token, and every role header, stay unsupervised.

Token ids are the truth where the regeneration engine recorded them (``meta.regen.answer_token_ids``,
one list per regenerated assistant turn): a target often emits a non-canonical split (" Jan" "et"
where its tokenizer writes " Janet"), and re-tokenizing the answer's text would train the drafter on
a sequence the target never produced -- one token off from there on. A turn's recorded ids replace
the tokens of its content span when they decode to the same text; otherwise (a template that
rewrites the content, ids that do not match) the text's tokens are kept.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_tools.jsonl import iter_jsonl
from data_tools.regenerate import TRAINABLE


@dataclass
class TokenizedChat:
    input_ids: list[int]
    loss_mask: list[bool]
    spans: list[tuple[int, int]]  # token [start, end) of each assistant turn (end-of-turn token included)


def template_hash(template: str | None) -> str:
    return hashlib.sha256((template or "").encode()).hexdigest()[:16]


def _render(tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool,
            enable_thinking: bool | None) -> str:
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **kwargs)


def _content_span(text: str, content: str, start: int) -> tuple[int, int] | None:
    """(first, end) char positions of ``content`` in ``text`` at or after ``start``."""
    candidates = [content, content.strip()]
    if "</think>" in content:
        answer = content.split("</think>", 1)[1]
        candidates += [answer, answer.strip()]
    for c in candidates:
        if not c:
            continue
        k = text.find(c, start)
        if k >= 0:
            return k, k + len(c)
    return None


def tokenize_chat(tokenizer, messages: list[dict[str, Any]], enable_thinking: bool | None = None,
                  max_len: int | None = None, cut_turns: Collection[int] = (),
                  turn_ids: Sequence[Sequence[int] | None] = ()) -> TokenizedChat:
    """Token ids, loss mask and assistant spans of a conversation (see the module docstring).

    ``cut_turns``: ordinals (0 = first assistant message) of turns cut at the length limit; their
    end-of-turn token is not supervised. ``turn_ids``: per assistant ordinal, the ids the target
    generated for that turn's content (None or missing: tokenize the text).

    Raises ValueError naming the turn when an assistant message cannot be located in the
    rendered text (a template that rewrites content)."""
    text = _render(tokenizer, messages, False, enable_thinking)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets: list[tuple[int, int]] = [tuple(o) for o in enc["offset_mapping"]]
    special = set(tokenizer.all_special_ids)
    mask = [False] * len(ids)
    spans: list[tuple[int, int]] = []
    splices: list[tuple[int, int, list[int]]] = []  # (token start, end, the target's own ids)
    cursor = 0
    assistant_turn = -1
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        assistant_turn += 1
        prompt = _render(tokenizer, messages[:i], True, enable_thinking)
        start = len(prompt) if text.startswith(prompt) and len(prompt) >= cursor else cursor
        content = str(m.get("content") or "")
        found = _content_span(text, content, start) if content.strip() else (start, start)
        if found is None:
            raise ValueError(f"assistant turn {i} ({content[:40]!r}...) is not in the text the chat template "
                             f"renders; the template rewrites message content: set target.chat_template")
        if prompt and not text.startswith(prompt):
            start = found[0]
        end = found[1]
        cursor = end
        tok = [k for k, (a, _) in enumerate(offsets) if start <= a < end]
        after = next((k for k, (a, b) in enumerate(offsets) if a >= end and b > a), None)
        if after is not None and ids[after] in special and assistant_turn not in cut_turns:
            tok.append(after)
        for k in tok:
            mask[k] = True
        if tok:
            spans.append((tok[0], tok[-1] + 1))
            content_tok = [k for k in tok if k != after]
            given = list(turn_ids[assistant_turn] or []) if assistant_turn < len(turn_ids) else []
            while given and given[-1] in special:  # an engine that reports the stop token with the answer
                given.pop()
            if given and content_tok and content_tok == list(range(content_tok[0], content_tok[-1] + 1)) \
                    and tokenizer.decode(list(given)) == tokenizer.decode(ids[content_tok[0]:content_tok[-1] + 1]):
                splices.append((content_tok[0], content_tok[-1] + 1, [int(t) for t in given]))
    for a, b, new in reversed(splices):  # right to left: earlier positions stay valid
        ids[a:b] = new
        mask[a:b] = [True] * len(new)
        shift = len(new) - (b - a)
        spans = [(s0, s1 + shift) if s0 == a else (s0 + shift, s1 + shift) if s0 > a else (s0, s1)
                 for s0, s1 in spans]
    if max_len is not None:
        ids, mask = ids[:max_len], mask[:max_len]
    return TokenizedChat(ids, mask, spans)


@dataclass
class ChatSequence:
    """One conversation ready for the target: ids and loss mask (truncated to max_seq_len)."""

    row_id: str
    split: str
    input_ids: list[int]
    loss_mask: list[bool]


def conversation_rows(input_path: str | Path) -> tuple[list[tuple[int, Any]], list[Path]]:
    """(line number, row) of the conversation file(s) behind ``input_path``: a regenerate
    folder (regenerated.jsonl), a prompts folder (train.jsonl + heldout.jsonl: the original
    answers) or one JSONL file."""
    path = Path(input_path)
    if path.is_dir():
        if (path / "regenerated.jsonl").exists():
            files = [path / "regenerated.jsonl"]
        elif (path / "train.jsonl").exists():
            files = [f for f in (path / "train.jsonl", path / "heldout.jsonl") if f.exists()]
        else:
            raise FileNotFoundError(f"input={path} holds neither regenerated.jsonl (`deepspec data regenerate`) "
                                    f"nor train.jsonl (`deepspec data prompts`)")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"input={path}: no such file or folder")
    rows = []
    for file in files:
        split = "heldout" if file.name == "heldout.jsonl" else None
        for line_no, row in iter_jsonl(file):
            if split and isinstance(row, dict):
                row.setdefault("split", split)
            rows.append((line_no, row))
    return rows, files


def load_sequences(input_path: str | Path, tokenizer, max_seq_len: int) -> tuple[list[ChatSequence], Counter, str]:
    """Tokenized conversations with loss masks, the dropped-row count per reason, and a digest
    of the input and tokenizer (for resume fingerprints). Rows with a ``status`` other than
    ``success`` or ``truncated`` (regenerate errors / skips) and rows with no supervised token are
    dropped. The chat template is rendered with the thinking switch the row was regenerated with;
    a turn whose ``meta.regen.finish_reasons`` entry is ``length`` gets no end-of-turn label; a turn
    with ``meta.regen.answer_token_ids`` keeps the ids the target generated."""
    rows, files = conversation_rows(input_path)
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.read_bytes())
    digest.update(str(max_seq_len).encode())
    dropped: Counter = Counter()
    out: list[ChatSequence] = []
    for line_no, row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
            dropped["no_messages"] += 1
            continue
        if row.get("status", "success") not in TRAINABLE:
            dropped[f"regen_{row['status']}"] += 1
            continue
        regen = (row.get("meta") or {}).get("regen") or {}
        cut = [k for k, reason in enumerate(regen.get("finish_reasons") or []) if reason == "length"]
        try:
            chat = tokenize_chat(tokenizer, row["messages"], enable_thinking=regen.get("thinking"),
                                 max_len=max_seq_len, cut_turns=cut, turn_ids=regen.get("answer_token_ids") or ())
        except ValueError:
            dropped["template_mismatch"] += 1
            continue
        if not any(chat.loss_mask):
            dropped["no_loss_tokens"] += 1
            continue
        out.append(ChatSequence(str(row.get("id", line_no)), str(row.get("split", "train")), chat.input_ids,
                                chat.loss_mask))
    return out, dropped, digest.hexdigest()[:16]
