"""Format detection and validation on good and bad files: every problem with file:line and field."""

from __future__ import annotations

import json

import pytest

from app.core.data.validate import check_file
from app.core.errors import DatasetError
from conftest import EXAMPLES

EXPECTED_FORMATS = {
    "messages.jsonl": "messages",
    "sharegpt.jsonl": "sharegpt",
    "alpaca.json": "alpaca",
    "alpaca.parquet": "alpaca",
    "prompt_completion.jsonl": "prompt_completion",
    "text.jsonl": "text",
    "preference.json": "preference",  # a .json array: the tiny test tokenizer learns from the .jsonl files only
}


@pytest.mark.parametrize("name,fmt", sorted(EXPECTED_FORMATS.items()))
def test_every_example_file_passes_with_its_format(name, fmt):
    report = check_file(EXAMPLES / name)
    assert report.format == fmt
    assert report.problems == []
    assert len(report.examples) == report.rows >= 3


def test_bom_crlf_and_blank_lines_are_fine(tmp_path):
    row = json.dumps({"prompt": "Q:", "completion": " A"})
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + f"{row}\r\n\r\n{row}\r\n   \n{row}".encode())
    report = check_file(path)
    assert report.ok and len(report.examples) == 3
    assert [e.line for e in report.examples] == [1, 3, 5]


def _write_rows(tmp_path, rows: list) -> str:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows) + b"\n")
    return str(path)


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
BAD_ROWS = [
    (b'{"messages": [', "", "bad JSON"),
    ({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "messages[0].role", "unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "messages", "no assistant turn"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
     "messages[1].content", "empty content"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]},
     "messages[0].content", "expected a string, got a number"),
    ({"messages": "hello"}, "messages", "expected a list"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "url": "x"}]},
                   {"role": "assistant", "content": "a"}]}, "messages[0].content[0]", "only text parts"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "a"}]}, "messages[1].role", "can only come first"),
    (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "", "not UTF-8"),
    (b"[1, 2]", "", "expected a JSON object, got a list"),
    ({"question": "q", "answer": "a"}, "", "no known format (keys: answer, question)"),
    ({"text": "plain"}, "", "looks like plain text, but this file is OpenAI messages (from line 1)"),
]


@pytest.mark.parametrize("row,field,message", BAD_ROWS, ids=[m for _, _, m in BAD_ROWS])
def test_bad_row_is_reported_with_line_and_field(tmp_path, row, field, message):
    path = _write_rows(tmp_path, [GOOD, row, GOOD])
    report = check_file(path)
    assert len(report.problems) == 1, report.problems
    problem = report.problems[0]
    assert (problem.file, problem.line, problem.field) == (path, 2, field)
    assert message in problem.message
    assert str(problem).startswith(f"{path}:2: ")
    assert len(report.examples) == 2


def test_all_problems_are_reported_not_just_the_first(tmp_path):
    rows = [GOOD] + [row for row, _, _ in BAD_ROWS] + [GOOD]
    report = check_file(_write_rows(tmp_path, rows))
    assert [p.line for p in report.problems] == list(range(2, 2 + len(BAD_ROWS)))
    with pytest.raises(DatasetError, match=rf"bad.jsonl:2: .*and {len(BAD_ROWS) - 1} more problems.*--skip-bad"):
        report.raise_if_unusable(skip_bad=False)
    report.raise_if_unusable(skip_bad=True)  # the good rows can be trained on


@pytest.mark.parametrize("fmt_rows,field,message", [
    ([{"instruction": "", "output": "x"}], "instruction", "is empty"),
    ([{"instruction": "i", "input": 3, "output": "x"}], "input", "expected a string"),
    ([{"prompt": "p", "completion": ""}], "completion", "is empty"),
    ([{"text": None}], "text", "missing 'text'"),
    ([{"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]}],
     "conversations[1].from", "use one of system, human, user, gpt, assistant"),
])
def test_other_formats_report_their_fields(tmp_path, fmt_rows, field, message):
    report = check_file(_write_rows(tmp_path, fmt_rows))
    assert report.problems[0].line == 1
    assert report.problems[0].field == field
    assert message in report.problems[0].message


@pytest.mark.parametrize("content,suffix,message", [
    (b"", ".jsonl", "the file is empty"),
    (b"\n \r\n", ".jsonl", "the file is empty"),
    (b"a,b\n", ".csv", "unsupported file type '.csv'"),
])
def test_whole_file_problems_raise(tmp_path, content, suffix, message):
    path = tmp_path / f"data{suffix}"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=message):
        check_file(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DatasetError, match=r"nope.jsonl: no such file"):
        check_file(tmp_path / "nope.jsonl")


def test_json_array_reports_the_line_each_item_starts_on(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": ""},\n  {"text": "c"}\n]\n')
    report = check_file(path)
    assert [(p.line, p.field) for p in report.problems] == [(3, "text")]
    assert [e.line for e in report.examples] == [2, 4]


def test_json_array_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b" oops}\n]\n')
    with pytest.raises(DatasetError, match=r"d.json:3: bad JSON"):
        check_file(path)


def test_a_binary_file_is_one_line_naming_the_first_nul_byte(tmp_path):
    """4 KB of noise used to list one "problem" per chunk between newlines (41 lines)."""
    import random

    rng = random.Random(0)
    noise = bytes(rng.getrandbits(8) for _ in range(4096))
    path = tmp_path / "photo.jsonl"
    path.write_bytes(noise)
    with pytest.raises(DatasetError) as caught:
        check_file(path)
    message = str(caught.value)
    assert len(message.splitlines()) == 1
    assert f"not a text file: NUL bytes at offset {noise.index(0)}; expected JSONL" in message


def test_utf16_text_is_told_to_be_saved_as_utf8(tmp_path):
    path = tmp_path / "excel.jsonl"
    path.write_bytes('{"text": "hello"}\n'.encode("utf-16"))
    with pytest.raises(DatasetError, match="is UTF-16 text; save it as UTF-8"):
        check_file(path)


def test_deep_nesting_and_giant_lines_are_one_problem_each_and_the_rest_is_read(tmp_path, monkeypatch):
    import app.core.data.read as read

    monkeypatch.setattr(read, "MAX_LINE_BYTES", 300_000)  # 16 MiB in use; the same code path
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n' + "[" * 100_000 + "]" * 100_000 + "\n" + '{"text": "' + "x" * 400_000
                    + '"}\n{"text": "d"}\n')
    report = check_file(path)  # raised RecursionError before
    assert [(p.line, p.message.split(";")[0]) for p in report.problems] == [
        (2, "JSON nested too deeply to read (over about 1,000 levels)"), (3, "a line longer than 300,000 bytes")]
    assert [e.line for e in report.examples] == [1, 4]


def test_a_deeply_nested_json_array_item_is_one_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"text": "a"},\n  ' + "[" * 100_000 + "]" * 100_000 + "\n]\n")
    with pytest.raises(DatasetError, match=r"d.json:3: JSON nested too deeply"):
        check_file(path)
