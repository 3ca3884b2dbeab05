"""API keys never reach a file or a log (issue row 1): the key is read from the environment
(OPENAI_API_KEY or regen.api_key_env) at run time, a key given on the command line is redacted in
config.yaml and `--cfg job`, and a server echoing the key back does not get it into the journal."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from deepspec.cli import main

MARKER = "sk-MARKER0123456789abcdef"


class KeyServer:
    """An OpenAI-compatible stub recording each request's Authorization header; `reject` answers 401
    with the key echoed in the body, as some APIs do."""

    def __init__(self, reject: bool = False):
        self.auth: list[str] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = self.headers.get("Authorization", "")
                stub.auth.append(key)
                if reject:
                    reply, code = {"error": f"Incorrect API key provided: {key.removeprefix('Bearer ')}"}, 401
                else:
                    reply, code = {"choices": [{"message": {"role": "assistant", "content": "ok"},
                                                "finish_reason": "stop"}], "usage": {"completion_tokens": 1}}, 200
                data = json.dumps(reply).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                del body

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _prompts(path: Path) -> Path:
    path.write_text("".join(json.dumps({"id": f"p{i}", "messages": [{"role": "user", "content": f"hi {i}"}]})
                            + "\n" for i in range(3)))
    return path


def _regenerate(tmp_path, url, *extra):
    return main(["data", "regenerate", "recipe=dspark_smollm2", f"input={_prompts(tmp_path / 'in.jsonl')}",
                 f"output_dir={tmp_path / 'out'}", "regen.engine=openai", f"regen.urls=[{url}]",
                 "regen.retries=0", *extra])


def _files_holding(folder: Path, text: str) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


@pytest.fixture
def server():
    s = KeyServer()
    yield s
    s.close()


def test_openai_api_key_is_read_from_the_environment_and_written_nowhere(tmp_path, server, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", MARKER)
    assert _regenerate(tmp_path, server.url) == 0
    assert server.auth and set(server.auth) == {f"Bearer {MARKER}"}  # the environment's key was sent
    assert _files_holding(tmp_path / "out", MARKER) == []
    out = capsys.readouterr()
    assert MARKER not in out.out + out.err


def test_a_key_on_the_command_line_is_redacted_in_config_yaml_and_cfg_job(tmp_path, server, capsys):
    assert _regenerate(tmp_path, server.url, f"regen.api_key={MARKER}") == 0
    assert set(server.auth) == {f"Bearer {MARKER}"}
    assert (tmp_path / "out" / "config.yaml").exists()
    assert _files_holding(tmp_path / "out", MARKER) == []
    assert main(["data", "regenerate", "recipe=dspark_smollm2", f"regen.api_key={MARKER}", "--cfg", "job"]) == 0
    assert MARKER not in capsys.readouterr().out


def test_api_key_env_names_another_variable(tmp_path, server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("MY_SERVER_KEY", MARKER)
    assert _regenerate(tmp_path, server.url, "regen.api_key_env=MY_SERVER_KEY") == 0
    assert set(server.auth) == {f"Bearer {MARKER}"}
    assert _files_holding(tmp_path / "out", MARKER) == []


def test_a_key_echoed_in_an_error_reaches_no_file_and_no_log(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", MARKER)
    server = KeyServer(reject=True)
    try:
        assert _regenerate(tmp_path, server.url) == 1  # every row failed: non-zero
    finally:
        server.close()
    journal = (tmp_path / "out" / "journal.jsonl").read_text()
    assert "HTTP 401" in journal and "<api key>" in journal
    assert _files_holding(tmp_path / "out", MARKER) == [] and _files_holding(tmp_path / "out", "sk-MARK") == []
    out = capsys.readouterr()
    assert "HTTP 401" in out.err and MARKER not in out.out + out.err
