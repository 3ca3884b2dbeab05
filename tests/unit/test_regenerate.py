"""Tests for `deepspec data regenerate` (data_tools.regenerate / hf_engine / openai_engine).

Protects: single- and multi-turn rows regenerate every assistant turn in order, each turn
conditioned on the regenerated history; every input row ends as exactly one of success /
truncated / error / skipped (bad JSON, no user turn, prompt too long; a turn cut at the length
limit makes its row truncated); splits and input order are kept; a run killed with SIGKILL
resumes to the same output with every row exactly once; a torn journal line is cut off; other
settings on the same folder are refused; the
OpenAI engine retries 500s, gives up on a timeout and on a 400, spreads requests over
its URLs and sends the sampling settings and the thinking switch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from data_tools.hf_engine import HFEngine
from data_tools.jsonl import iter_jsonl, write_jsonl_atomic
from data_tools.openai_engine import OpenAIEngine
from data_tools.regenerate import (
    JOURNAL_FILE,
    OUTPUT_FILE,
    SamplingSettings,
    read_input_rows,
    run_regeneration,
)
from tests.tiny import LOAD_CHAT_TARGET as LOAD_TINY
from tests.tiny import chat_target as load_chat_target

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def target():
    return load_chat_target()


def rows_of(path: Path) -> list[dict]:
    return [obj for _, obj in iter_jsonl(path)]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def write_input(path: Path) -> Path:
    rows = [
        {"id": "a", "source": "t", "messages": [user("What is 2+2?")], "meta": {}},
        {"id": "b", "source": "t", "messages": [{"role": "system", "content": "Be brief."}, user("Hi"),
                                                {"role": "assistant", "content": "ORIGINAL ANSWER"},
                                                user("And then?")], "meta": {"k": 1}},
        {"turns": ["Name a colour.", "Another one?", "And a third?"]},
        {"id": "d", "source": "t", "messages": [{"role": "system", "content": "only a system turn"}], "meta": {}},
        {"id": "e", "source": "t", "messages": [user("word " * 300)], "meta": {}},
    ]
    lines = [json.dumps(r) for r in rows]
    lines.insert(3, "{not json")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_hf_engine_formats_turns_and_accounting(tmp_path, target):
    settings = SamplingSettings(max_new_tokens=6, max_seq_len=128)
    engine = HFEngine(target, settings, batch_size=4)
    seen_histories = []
    real_prompt_ids = engine.prompt_ids
    engine.prompt_ids = lambda history: seen_histories.append(list(history)) or real_prompt_ids(history)
    summary = run_regeneration(write_input(tmp_path / "in.jsonl"), tmp_path / "out", engine, settings,
                               progress=False)
    out = rows_of(tmp_path / "out" / OUTPUT_FILE)
    assert [r["index"] for r in out] == list(range(6))  # input order, every row once
    # 6 new tokens never reach the tiny random model's end of turn: every answered row is truncated
    assert [r["status"] for r in out] == ["truncated"] * 3 + ["skipped"] * 3
    assert all(r["meta"]["regen"]["finish_reasons"] == ["length"] * len(r["meta"]["regen"]["finish_reasons"])
               for r in out[:3])
    assert [r.get("reason") for r in out[3:]] == ["bad_json", "no_user_turn", "prompt_too_long"]
    assert summary["input_rows"] == 6 == (summary["success"] + summary["truncated"] + summary["error"]
                                          + summary["skipped"])
    assert summary["skipped_by_reason"] == {"bad_json": 1, "no_user_turn": 1, "prompt_too_long": 1}

    roles = [[m["role"] for m in r["messages"]] for r in out[:3]]
    assert roles == [["user", "assistant"], ["system", "user", "assistant", "user", "assistant"],
                     ["user", "assistant"] * 3]
    multi = out[1]["messages"]
    assert "ORIGINAL ANSWER" not in [m["content"] for m in multi]
    # turn 2 was generated from a history holding the regenerated turn-1 answer
    turn2 = [h for h in seen_histories if len(h) == 4 and h[1]["content"] == "Hi"]
    assert turn2 and turn2[-1][2] == multi[2]
    regen = out[1]["meta"]["regen"]
    assert out[1]["meta"]["k"] == 1
    assert regen["engine"] == "hf" and regen["temperature"] == 0.0 and regen["thinking"] is False
    assert len(regen["finish_reasons"]) == 2 and regen["new_tokens"] >= 2
    assert summary["engine"]["tokenizer_hash"] == target.tokenizer_hash()


def test_prompts_folder_keeps_split_and_max_rows(tmp_path, target):
    write_jsonl_atomic(tmp_path / "p" / "train.jsonl", [{"id": f"t{i}", "source": "s", "messages": [user(f"q{i}")],
                                                         "meta": {}} for i in range(3)])
    write_jsonl_atomic(tmp_path / "p" / "heldout.jsonl", [{"id": "h0", "source": "s",
                                                           "messages": [user("held")], "meta": {}}])
    rows, _ = read_input_rows(tmp_path / "p")
    assert [(r.id, r.split) for r in rows] == [("t0", "train"), ("t1", "train"), ("t2", "train"),
                                               ("h0", "heldout")]
    settings = SamplingSettings(max_new_tokens=3)
    summary = run_regeneration(tmp_path / "p", tmp_path / "o", HFEngine(target, settings, batch_size=2), settings,
                               max_rows=2, progress=False)
    assert summary["input_rows"] == 2 == summary["success"] + summary["truncated"]
    summary = run_regeneration(tmp_path / "p", tmp_path / "o2", HFEngine(target, settings), settings,
                               progress=False)
    assert [r["split"] for r in rows_of(tmp_path / "o2" / OUTPUT_FILE)] == ["train"] * 3 + ["heldout"]


def test_fingerprint_mismatch_and_torn_journal(tmp_path, target):
    settings = SamplingSettings(max_new_tokens=3)
    inp = write_input(tmp_path / "in.jsonl")
    first = run_regeneration(inp, tmp_path / "o", HFEngine(target, settings), settings, progress=False)
    first_rows = rows_of(tmp_path / "o" / OUTPUT_FILE)
    with pytest.raises(ValueError, match="other settings.*max_new_tokens|delete"):
        other = SamplingSettings(max_new_tokens=4)
        run_regeneration(inp, tmp_path / "o", HFEngine(target, other), other, progress=False)
    journal = tmp_path / "o" / JOURNAL_FILE
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join(lines[:2]) + lines[2][:15])  # killed mid-write of the third row
    again = run_regeneration(inp, tmp_path / "o", HFEngine(target, settings), settings, progress=False)
    assert again["resumed_rows"] == 2
    assert rows_of(tmp_path / "o" / OUTPUT_FILE) == first_rows
    assert (again["truncated"], again["skipped"]) == (first["truncated"], first["skipped"])


SLOW_SCRIPT = textwrap.dedent("""
    import sys, time
    {load}
    from data_tools.hf_engine import HFEngine
    from data_tools.regenerate import SamplingSettings, run_regeneration

    class Paced(HFEngine):  # the test's pacing: one result every 0.15 s, so a kill lands mid-run
        def generate_rows(self, rows):
            for result in super().generate_rows(rows):
                time.sleep(0.15)
                yield result

    settings = SamplingSettings(max_new_tokens=5)
    run_regeneration(sys.argv[1], sys.argv[2], Paced(target, settings, batch_size=1), settings, progress=False)
""")


@pytest.mark.slow  # a subprocess loads torch + the tokenizer: ~20 s idle, more on a busy machine
def test_sigkill_resume_every_row_once(tmp_path, target):
    rows = [{"id": f"r{i}", "source": "s", "messages": [user(f"question {i} " * (1 + i % 4))], "meta": {}}
            for i in range(16)]
    inp = tmp_path / "in.jsonl"
    write_jsonl_atomic(inp, rows)
    script = tmp_path / "run.py"
    script.write_text(SLOW_SCRIPT.format(load=LOAD_TINY))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, str(script), str(inp), str(tmp_path / "killed")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    journal = tmp_path / "killed" / JOURNAL_FILE
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_text().count("\n") >= 4:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    done_before = journal.read_text().count("\n")
    assert 4 <= done_before < 16

    settings = SamplingSettings(max_new_tokens=5)
    resumed = run_regeneration(inp, tmp_path / "killed", HFEngine(target, settings, batch_size=1), settings,
                               progress=False)
    clean = run_regeneration(inp, tmp_path / "clean", HFEngine(target, settings, batch_size=1), settings,
                             progress=False)
    assert resumed["resumed_rows"] == done_before
    out = rows_of(tmp_path / "killed" / OUTPUT_FILE)
    assert [r["index"] for r in out] == list(range(16))
    assert out == rows_of(tmp_path / "clean" / OUTPUT_FILE)
    assert resumed["truncated"] == clean["truncated"] == 16


class StubServer:
    """A tiny OpenAI-compatible server: replies 'echo: <last user text>' with per-text behaviours;
    ``strict``: refuses unknown fields (`return_token_ids`) with HTTP 400, as the OpenAI API does."""

    def __init__(self, fail_first: dict[str, int], slow: set[str], bad: set[str], strict: bool = False):
        self.requests: list[dict] = []
        self.fail_first, self.slow, self.bad, self.strict = dict(fail_first), slow, bad, strict
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append({"path": self.path, "port": self.server.server_port, **body})
                last = body["messages"][-1]["content"]
                if last in stub.bad:
                    return self._send(400, {"error": "context too long"})
                if stub.strict and "return_token_ids" in body:
                    return self._send(400, {"error": "Unrecognized request argument supplied: return_token_ids"})
                if stub.fail_first.get(last, 0) > 0:
                    stub.fail_first[last] -= 1
                    return self._send(500, {"error": "busy"})
                if last in stub.slow:
                    time.sleep(1.0)
                choice = {"message": {"role": "assistant", "content": f"echo: {last}"}, "finish_reason": "stop"}
                if body.get("return_token_ids"):  # as vLLM does: the generated ids, stop token included
                    choice["token_ids"] = [len(last), 7, 2]
                self._send(200, {"choices": [choice], "usage": {"completion_tokens": 3}})

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.servers = [ThreadingHTTPServer(("127.0.0.1", 0), Handler) for _ in range(2)]
        for s in self.servers:
            s.daemon_threads = True
            threading.Thread(target=s.serve_forever, daemon=True).start()
        self.urls = [f"http://127.0.0.1:{s.server_port}" for s in self.servers]

    def close(self):
        for s in self.servers:
            s.shutdown()
            s.server_close()


def test_openai_engine_retries_timeout_and_round_robin(tmp_path):
    stub = StubServer(fail_first={"flaky": 2, "hopeless": 99}, slow={"slow"}, bad={"too long"})
    rows = [{"id": "ok", "source": "s", "messages": [user("one"), {"role": "assistant", "content": "x"},
                                                     user("two")], "meta": {}},
            {"id": "flaky", "source": "s", "messages": [user("flaky")], "meta": {}},
            {"id": "hopeless", "source": "s", "messages": [user("hopeless")], "meta": {}},
            {"id": "slow", "source": "s", "messages": [user("slow")], "meta": {}},
            {"id": "bad", "source": "s", "messages": [user("too long")], "meta": {}}]
    write_jsonl_atomic(tmp_path / "in.jsonl", rows)
    settings = SamplingSettings(max_new_tokens=7, temperature=0.6, top_p=0.9, top_k=20, thinking=True)
    engine = OpenAIEngine(stub.urls, "served-model", settings, concurrency=3, retries=3, timeout_s=0.5,
                          backoff_s=0.01, return_token_ids=False)
    try:
        summary = run_regeneration(tmp_path / "in.jsonl", tmp_path / "o", engine, settings, progress=False,
                                   max_error_fraction=1.0)  # 3 of 5 fail by design
    finally:
        stub.close()
    out = {r["id"]: r for r in rows_of(tmp_path / "o" / OUTPUT_FILE)}
    assert [m["content"] for m in out["ok"]["messages"]] == ["one", "echo: one", "two", "echo: two"]
    assert out["flaky"]["status"] == "success"  # two 500s, then served
    assert out["hopeless"]["status"] == "error" and "4 attempts" in out["hopeless"]["error"]
    assert out["slow"]["status"] == "error" and "timed out" in out["slow"]["error"].lower()
    assert out["bad"]["status"] == "error" and "HTTP 400" in out["bad"]["error"]
    assert sum(r["path"] == "/v1/chat/completions" for r in stub.requests) == len(stub.requests)
    assert len([r for r in stub.requests if r["messages"][-1]["content"] == "too long"]) == 1  # 400: no retry
    assert {r["port"] for r in stub.requests} == {s.server_port for s in stub.servers}
    second = [r for r in stub.requests if r["messages"][-1]["content"] == "two"][0]
    assert second["messages"][1] == {"role": "assistant", "content": "echo: one"}  # regenerated history
    assert (second["max_tokens"], second["temperature"], second["top_p"], second["top_k"]) == (7, 0.6, 0.9, 20)
    assert second["chat_template_kwargs"] == {"enable_thinking": True} and second["model"] == "served-model"
    assert (summary["success"], summary["error"], summary["skipped"]) == (2, 3, 0)
    assert out["ok"]["meta"]["regen"]["engine"] == "openai" and out["ok"]["meta"]["regen"]["thinking"] is True
    assert "answer_token_ids" not in out["ok"]["meta"]["regen"] and "return_token_ids" not in second


def test_openai_engine_records_the_servers_token_ids_when_asked(tmp_path):
    stub = StubServer(fail_first={}, slow=set(), bad=set())
    rows = [{"id": "ok", "source": "s", "messages": [user("one"), {"role": "assistant", "content": "x"},
                                                     user("three")], "meta": {}}]
    write_jsonl_atomic(tmp_path / "in.jsonl", rows)
    settings = SamplingSettings(max_new_tokens=7)
    engine = OpenAIEngine(stub.urls, "m", settings, return_token_ids=True)
    try:
        run_regeneration(tmp_path / "in.jsonl", tmp_path / "o", engine, settings, progress=False)
    finally:
        stub.close()
    (out,) = rows_of(tmp_path / "o" / OUTPUT_FILE)
    assert all(r["return_token_ids"] is True for r in stub.requests)
    assert out["meta"]["regen"]["answer_token_ids"] == [[3, 7, 2], [5, 7, 2]]  # per turn, as served


def test_openai_engine_asks_for_token_ids_until_a_server_refuses_the_field(tmp_path):
    """regen.return_token_ids=null (auto, the default): ids are asked for and kept where the server
    returns them; a server that refuses the field costs one refused request, after which the field is
    no longer sent; a 400 the request gets without the field too is the row's error and changes nothing."""
    rows = [{"id": f"r{i}", "source": "s", "messages": [user(f"q{i}")], "meta": {}} for i in range(4)]
    rows.append({"id": "bad", "source": "s", "messages": [user("too long")], "meta": {}})
    write_jsonl_atomic(tmp_path / "in.jsonl", rows)
    settings = SamplingSettings(max_new_tokens=7)
    for strict in (False, True):
        stub = StubServer(fail_first={}, slow=set(), bad={"too long"}, strict=strict)
        engine = OpenAIEngine(stub.urls, "m", settings, concurrency=1)  # rows in order: "bad" comes last
        try:
            run_regeneration(tmp_path / "in.jsonl", tmp_path / f"o{strict}", engine, settings, progress=False,
                             max_error_fraction=1.0)
        finally:
            stub.close()
        out = {r["id"]: r for r in rows_of(tmp_path / f"o{strict}" / OUTPUT_FILE)}
        assert out["bad"]["status"] == "error" and "context too long" in out["bad"]["error"]
        asked = ["return_token_ids" in r for r in stub.requests]
        if not strict:  # vLLM: every request asks, every answer keeps its ids
            assert asked == [True] * 5 + [False] and engine.token_ids_refused is False
            assert all(out[f"r{i}"]["meta"]["regen"]["answer_token_ids"] == [[2, 7, 2]] for i in range(4))
            # "bad" last: once with the field, once without (the 400 stays: the row's error, ids still asked)
        else:  # refused once, retried without the field, never sent again
            assert asked[:2] == [True, False] and not any(asked[2:]) and engine.token_ids_refused is True
            assert all(out[f"r{i}"]["status"] == "success" for i in range(4))
            assert all("answer_token_ids" not in out[f"r{i}"]["meta"]["regen"] for i in range(4))
            assert len(stub.requests) == 6  # 4 rows + the refused one + "bad" (sent once: the field is off)
