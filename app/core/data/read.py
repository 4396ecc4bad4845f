"""Read a dataset file into (line number, record) pairs, reporting unreadable rows as problems.

JSONL is streamed line by line so that one bad line never hides the others; a JSON array file is
walked element by element with the line each element starts on; parquet rows are numbered from 1.
A UTF-8 byte-order mark, CRLF line ends and blank lines are accepted. A file that is not text
(NUL bytes, UTF-16) is refused in one line before any row is read; a line longer than
MAX_LINE_BYTES and JSON nested deeper than Python's reader allows are one problem each.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from app.core.errors import DatasetError

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".parquet")
MAX_LINE_BYTES = 16 * 2 ** 20  # one chat: far more than any context window holds
SNIFF_BYTES = 64 * 1024


@dataclass(frozen=True)
class Problem:
    """One unusable row: where it is, which field, and what is wrong (with the fix)."""

    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = self.file + (f":{self.line}" if self.line is not None else "")
        return f"{where}: {self.field + ': ' if self.field else ''}{self.message}"


@dataclass(frozen=True)
class Row:
    """A row that parsed: its line (JSONL/JSON) or row number (parquet) and its content."""

    line: int
    record: Any


def read_rows(path: str | Path) -> Iterator[Row | Problem]:
    """Yield each row of the file, or a Problem for a row that cannot be parsed.

    Raises DatasetError for problems with the whole file (missing, empty, wrong type).
    """
    path = Path(path)
    name = str(path)
    if not path.exists():
        raise DatasetError("no such file; check the path", file=name)
    if path.is_dir():
        raise DatasetError("is a folder; give a .jsonl, .json or .parquet file", file=name)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DatasetError(f"unsupported file type '{suffix or 'none'}'; use .jsonl, .json or .parquet",
                           file=name)
    if suffix == ".parquet":
        yield from _read_parquet(path)
        return
    with open(path, "rb") as handle:
        head = handle.read(SNIFF_BYTES)
    _refuse_binary(name, head)
    start = 3 if head.startswith(b"\xef\xbb\xbf") else 0
    if not head[start:].strip() and path.stat().st_size <= SNIFF_BYTES:
        raise DatasetError("the file is empty; add one example per line", file=name)
    if suffix == ".json" and head[start:].lstrip()[:1] == b"[":
        data = path.read_bytes()[start:]  # one JSON document: read whole
        _refuse_binary(name, data)
        yield from _read_json_array(name, data)
    else:
        yield from _read_jsonl(name, path, start)


def _refuse_binary(name: str, data: bytes) -> None:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DatasetError("the file is UTF-16 text; save it as UTF-8 (one JSON object per line)", file=name)
    offset = data.find(b"\x00")
    if offset != -1:
        raise DatasetError(f"not a text file: NUL bytes at offset {offset}; expected JSONL (one JSON object "
                           "per line), JSON or parquet", file=name)


def _read_jsonl(name: str, path: Path, start: int) -> Iterator[Row | Problem]:
    with open(path, "rb") as handle:
        handle.seek(start)
        number = 0
        while True:
            raw = handle.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            number += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):  # skip the rest of the line
                    raw = handle.readline(MAX_LINE_BYTES)
                size = (f"{MAX_LINE_BYTES // 2 ** 20} MiB" if MAX_LINE_BYTES % 2 ** 20 == 0
                        else f"{MAX_LINE_BYTES:,} bytes")
                yield Problem(name, number, "", f"a line longer than {size}; one example per line, "
                                                "each far shorter")
                continue
            nul = raw.find(b"\x00")
            if nul != -1:
                yield Problem(name, number, "", f"NUL bytes at column {nul + 1}; this line is not text")
                continue
            yield from _parse_line(name, number, raw.rstrip(b"\n").rstrip(b"\r"))


def _parse_line(name: str, number: int, raw: bytes) -> Iterator[Row | Problem]:
    if not raw.strip():
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        yield Problem(name, number, "", f"bytes that are not UTF-8 at column {err.start + 1}; "
                                        "save the file as UTF-8")
        return
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        yield Problem(name, number, "", f"bad JSON: {json_error(err)}; each line must be one JSON object")
        return
    except RecursionError:
        yield Problem(name, number, "", "JSON nested too deeply to read (over about 1,000 levels); a chat "
                                        "needs three")
        return
    yield Row(number, record)


def _read_json_array(name: str, data: bytes) -> Iterator[Row | Problem]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DatasetError("bytes that are not UTF-8; save the file as UTF-8", file=name, line=line)
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        pos = _skip_space(text, pos)
        if pos < len(text) and text[pos] == "]":
            return
        line = text.count("\n", 0, pos) + 1
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DatasetError(f"bad JSON: {json_error(err)}; the rest of the array "
                               "cannot be read", file=name, line=err.lineno)
        except RecursionError:
            raise DatasetError("JSON nested too deeply to read (over about 1,000 levels); the rest of the "
                               "array cannot be read", file=name, line=line) from None
        yield Row(line, record)
        pos = _skip_space(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos >= len(text) or text[pos] != "]":
            line = text.count("\n", 0, pos) + 1
            raise DatasetError("bad JSON: expected ',' or ']' between array items", file=name, line=line)


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _read_parquet(path: Path) -> Iterator[Row | Problem]:
    import pyarrow.parquet as pq  # comes with `datasets`

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise DatasetError(f"cannot read parquet: {err}", file=str(path)) from err
    if table.num_rows == 0:
        raise DatasetError("the file has no rows", file=str(path))
    for number, record in enumerate(table.to_pylist(), start=1):
        yield Row(number, record)


def json_error(err: json.JSONDecodeError) -> str:
    """"Expecting value at column 3"; json's own "Unterminated string starting at" ends in "at"."""
    return f"{err.msg.removesuffix(' at')} at column {err.colno}"
