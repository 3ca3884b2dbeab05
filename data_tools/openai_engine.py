"""Regeneration engine `openai`: any OpenAI-compatible ``/v1/chat/completions`` server.

vLLM, SGLang, llama.cpp's server and the OpenAI API all speak it. Rows run in a thread
pool (``concurrency`` rows in flight, each row's turns in order); requests go to the
server URLs round-robin. A request that fails with a connection error, a timeout, HTTP
408/429 or 5xx is retried up to ``retries`` times with exponential backoff
(``backoff_s * 2**attempt``); other HTTP errors (400: e.g. a prompt over the server's
context) end the row as ``error`` at once. ``timeout_s`` bounds a whole row (all its
turns and retries). Uses only the standard library (``urllib``).

The API key (``Authorization: Bearer``) comes from the environment (``api_key_from_env``,
``regen.api_key_env``) and stays in memory: it is not part of the engine's identity, and
error messages never include request headers.

The thinking switch is sent as ``chat_template_kwargs: {"enable_thinking": ...}`` (the
vLLM / SGLang extension); a reply's ``reasoning_content`` (servers with a reasoning
parser) is kept on the assistant message.

The generated token ids (``return_token_ids``, vLLM's extension; recorded as
``meta.regen.answer_token_ids`` so training need not re-tokenize the text): ``True`` asks for
them, ``False`` never does, ``None`` (auto, the default) asks until a server refuses a request
with HTTP 400/422 that the same request without the field passes; from then on the field is
no longer sent and rows are tokenized from their text. A 400 that the request without the field
also gets (e.g. a prompt over the context) is the row's error, as before, and changes nothing.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from data_tools.regenerate import InputRow, RowResult, SamplingSettings, in_flight

RETRY_STATUS = {408, 429}
REFUSED_FIELD_STATUS = {400, 422}  # how OpenAI-compatible servers refuse a field they do not know


def api_key_from_env(name: str | None) -> str | None:
    """The API key in environment variable ``name`` (None when unset or empty)."""
    if not name:
        return None
    if not name.replace("_", "").isalnum():
        raise ValueError("regen.api_key_env is not an environment variable name (its value is not shown: it may "
                         "be the key itself); set it to the name of the variable holding the key, e.g. "
                         "OPENAI_API_KEY")
    return os.environ.get(name) or None


class RequestFailed(RuntimeError):
    """A request that will not succeed by retrying (or ran out of retries / time)."""


class RefusedRequest(RequestFailed):
    """HTTP 400/422: the server refused the request as malformed (not retried)."""


def chat_url(url: str) -> str:
    """``http://host:port``, ``.../v1`` or the full endpoint -> the full endpoint URL."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


class OpenAIEngine:
    """See the module docstring."""

    def __init__(self, urls: list[str], model: str, settings: SamplingSettings, api_key: str | None = None,
                 concurrency: int = 8, retries: int = 3, timeout_s: float = 300.0, backoff_s: float = 1.0,
                 return_token_ids: bool | None = None):
        if not urls:
            raise ValueError("regen.engine=openai needs regen.urls=[http://host:port,...] "
                             "(OpenAI-compatible servers, e.g. `vllm serve`)")
        if concurrency < 1 or retries < 0 or timeout_s <= 0:
            raise ValueError(f"regen.concurrency={concurrency} (>= 1), regen.retries={retries} (>= 0), "
                             f"regen.timeout_s={timeout_s} (> 0)")
        self.urls = [chat_url(u) for u in urls]
        self._next_url = itertools.cycle(range(len(self.urls)))
        self._lock = threading.Lock()
        self.model = model
        self.settings = settings
        self.api_key = api_key
        self.concurrency = concurrency
        self.retries = retries
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.return_token_ids = return_token_ids  # None: auto (see the module docstring)
        self.token_ids_refused = False  # auto: a server refused the field; no longer sent
        self.identity: dict[str, Any] = {"engine": "openai", "name": model}

    def generate_rows(self, rows: list[InputRow]) -> Iterator[RowResult]:
        return in_flight(self.run_row, rows, self.concurrency, "regen")

    def run_row(self, row: InputRow) -> RowResult:
        """All turns of one row; any failure makes the row an ``error`` result."""
        deadline = time.monotonic() + self.timeout_s
        result = RowResult(row.index, "success")
        history: list[dict[str, Any]] = []
        try:
            for segment in row.segments(self.settings.max_turns):
                history = history + segment
                reply = self._chat(history, deadline)
                message = reply["choices"][0]["message"]
                assistant = {"role": "assistant", "content": message.get("content") or ""}
                if message.get("reasoning_content"):
                    assistant["reasoning_content"] = message["reasoning_content"]
                history = history + [assistant]
                finish = reply["choices"][0].get("finish_reason") or "stop"
                result.finish_reasons.append("length" if finish == "length" else "stop")
                if self.return_token_ids is not False:  # a server that ignores the field: [] (text tokenized)
                    result.token_ids.append([int(t) for t in reply["choices"][0].get("token_ids") or []])
                result.new_tokens += int((reply.get("usage") or {}).get("completion_tokens") or 0)
        except (RequestFailed, KeyError, IndexError, TypeError, ValueError) as exc:
            return RowResult(row.index, "error", reason=f"{type(exc).__name__}: {exc}")
        result.messages = history
        return result

    def _scrub(self, text: str) -> str:
        """``text`` (a server's error body) without the key, whole or echoed in part (``sk-ab***yz``)."""
        if self.api_key:
            text = text.replace(self.api_key, "<api key>")
        return re.sub(r"\bsk-[\w*.-]+", "<api key>", text)

    def _asks_token_ids(self) -> bool:
        return self.return_token_ids is True or (self.return_token_ids is None and not self.token_ids_refused)

    def _payload(self, messages: list[dict[str, Any]], token_ids: bool) -> bytes:
        s = self.settings
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": s.max_new_tokens,
                                "temperature": s.temperature, "top_p": s.top_p, "seed": s.seed,
                                "chat_template_kwargs": {"enable_thinking": s.thinking}}
        if s.top_k > 0:
            body["top_k"] = s.top_k
        if token_ids:
            body["return_token_ids"] = True
        return json.dumps(body).encode()

    def _chat(self, messages: list[dict[str, Any]], deadline: float) -> dict[str, Any]:
        asks = self._asks_token_ids()
        try:
            return self._post(self._payload(messages, asks), deadline)
        except RefusedRequest as refused:
            if not (asks and self.return_token_ids is None):
                raise
            try:  # auto: is it the field the server refuses?
                reply = self._post(self._payload(messages, False), deadline)
            except RefusedRequest:
                raise refused from None  # no: the request itself (e.g. over the context)
            with self._lock:
                first, self.token_ids_refused = not self.token_ids_refused, True
            if first:
                print(f"[regen] the server refused return_token_ids ({refused}); no longer asking: answers are "
                      f"tokenized from their text (regen.return_token_ids=false skips the refused request)",
                      file=sys.stderr, flush=True)
            return reply

    def _post(self, payload: bytes, deadline: float) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = "no attempt"
        for attempt in range(self.retries + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RequestFailed(f"row timed out after {self.timeout_s} s (regen.timeout_s); last: {last}")
            with self._lock:
                url = self.urls[next(self._next_url)]
            request = urllib.request.Request(url, data=payload, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=remaining) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as exc:
                detail = self._scrub(exc.read()[:200].decode("utf-8", "replace"))
                last = f"HTTP {exc.code} from {url}: {detail}"
                if exc.code in REFUSED_FIELD_STATUS:
                    raise RefusedRequest(last) from None
                if exc.code not in RETRY_STATUS and exc.code < 500:
                    raise RequestFailed(last) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                last = f"{type(exc).__name__} from {url}: {getattr(exc, 'reason', exc)}"
            if attempt < self.retries:
                time.sleep(max(0.0, min(self.backoff_s * 2 ** attempt, deadline - time.monotonic())))
        raise RequestFailed(f"{self.retries + 1} attempts failed; last: {last}")
