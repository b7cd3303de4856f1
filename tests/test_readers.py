"""Reading rows from JSONL, JSON, CSV and TSV: every row knows its file:line, every bad file fails with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.data.readers import expand_paths, read_file, read_records
from tunelab.errors import TunelabError


def _error(fn, *args) -> str:
    """Run fn and return the TunelabError message (one line)."""
    with pytest.raises(TunelabError) as info:
        result = fn(*args)
        list(result)  # read_file is lazy for some layouts
    msg = str(info.value)
    assert "\n" not in msg, f"error message is not one line: {msg!r}"
    return msg


def _lines(records) -> list[tuple[int, dict]]:
    return [(r.line, r.row) for r in records]


# ----------------------------------------------------------------------------------------------------------------------
# JSONL


def test_jsonl_rows_carry_file_and_line_with_blank_lines_counted(tmp_path: Path) -> None:
    p = tmp_path / "train.jsonl"
    p.write_text('{"a": 1}\n\n   \n{"a": 2}\n\n{"a": 3}\n', encoding="utf-8")
    records = read_records(str(p))
    assert _lines(records) == [(1, {"a": 1}), (4, {"a": 2}), (6, {"a": 3})]
    assert all(r.file == str(p) for r in records)
    assert records[1].where == f"{p}:4"


def test_jsonl_crlf_line_endings(tmp_path: Path) -> None:
    p = tmp_path / "train.jsonl"
    p.write_bytes(b'{"a": 1}\r\n\r\n{"a": 2}\r\n')
    assert _lines(read_records(str(p))) == [(1, {"a": 1}), (3, {"a": 2})]


def test_ndjson_suffix_reads_as_jsonl(tmp_path: Path) -> None:
    p = tmp_path / "train.ndjson"
    p.write_text('{"a": 1}\n{"a": 2}\n', encoding="utf-8")
    assert _lines(read_records(str(p))) == [(1, {"a": 1}), (2, {"a": 2})]


# ----------------------------------------------------------------------------------------------------------------------
# JSON


def test_json_array_rows_get_the_line_where_each_element_starts(tmp_path: Path) -> None:
    p = tmp_path / "train.json"
    p.write_text(
        '[\n'                      # 1
        '  {"a": 1,\n'             # 2
        '   "b": "x"},\n'          # 3
        '\n'                       # 4
        '  {\n'                    # 5
        '    "a": 2\n'             # 6
        '  }, {"a": 3},\n'         # 7
        '  {"a": 4}\n'             # 8
        ']\n',
        encoding="utf-8",
    )
    assert _lines(read_records(str(p))) == [(2, {"a": 1, "b": "x"}), (5, {"a": 2}), (7, {"a": 3}), (8, {"a": 4})]


def test_json_array_with_strings_containing_newline_escapes_and_brackets(tmp_path: Path) -> None:
    p = tmp_path / "train.json"
    rows = [{"text": "line one\nline two [x], {y}"}, {"text": "]"}]
    p.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    records = read_records(str(p))
    assert [r.row for r in records] == rows
    assert [r.line for r in records] == [2, 5]


def test_json_file_that_is_really_jsonl(tmp_path: Path) -> None:
    p = tmp_path / "train.json"
    p.write_text('{"a": 1}\n\n{"a": 2}\n', encoding="utf-8")
    assert _lines(read_records(str(p))) == [(1, {"a": 1}), (3, {"a": 2})]


def test_json_single_object_is_one_row(tmp_path: Path) -> None:
    p = tmp_path / "train.json"
    p.write_text('{\n  "a": 1\n}\n', encoding="utf-8")
    assert _lines(read_records(str(p))) == [(1, {"a": 1})]


# ----------------------------------------------------------------------------------------------------------------------
# CSV / TSV


def test_csv_with_header_rows_and_line_numbers(tmp_path: Path) -> None:
    p = tmp_path / "train.csv"
    p.write_text("instruction, output\nsay hi,hi\n\nsay bye,bye\n", encoding="utf-8")
    records = read_records(str(p))
    # header names are stripped; values are kept as written
    assert _lines(records) == [(2, {"instruction": "say hi", "output": "hi"}), (4, {"instruction": "say bye", "output": "bye"})]


def test_csv_rows_after_a_quoted_multiline_field_keep_their_line(tmp_path: Path) -> None:
    p = tmp_path / "train.csv"
    p.write_text('prompt,response\n"first\nsecond\nthird",ok\nnext,row\n', encoding="utf-8")
    records = read_records(str(p))
    assert records[0].row == {"prompt": "first\nsecond\nthird", "response": "ok"}
    assert records[1].row == {"prompt": "next", "response": "row"}
    assert records[1].line == 5


def test_csv_row_with_a_quoted_multiline_field_is_tagged_with_its_first_line(tmp_path: Path) -> None:
    p = tmp_path / "train.csv"
    p.write_text('prompt,response\n"first\nsecond\nthird",ok\nnext,row\n', encoding="utf-8")
    assert read_records(str(p))[0].line == 2


def test_csv_all_empty_rows_are_skipped(tmp_path: Path) -> None:
    p = tmp_path / "train.csv"
    p.write_text("a,b\n,\n1,2\n , \n", encoding="utf-8")
    assert _lines(read_records(str(p))) == [(3, {"a": "1", "b": "2"})]


def test_tsv_uses_tabs(tmp_path: Path) -> None:
    p = tmp_path / "train.tsv"
    p.write_text("prompt\tresponse\nhello, world\thi\n", encoding="utf-8")
    assert _lines(read_records(str(p))) == [(2, {"prompt": "hello, world", "response": "hi"})]


def test_suffix_is_case_insensitive(tmp_path: Path) -> None:
    p = tmp_path / "TRAIN.CSV"
    p.write_text("a\n1\n", encoding="utf-8")
    assert _lines(read_records(str(p))) == [(2, {"a": "1"})]


# ----------------------------------------------------------------------------------------------------------------------
# File-level problems


def test_utf8_bom_is_accepted_in_jsonl_json_and_csv(tmp_path: Path) -> None:
    bom = b"\xef\xbb\xbf"
    jl = tmp_path / "a.jsonl"
    jl.write_bytes(bom + b'{"a": 1}\n{"a": 2}\n')
    js = tmp_path / "b.json"
    js.write_bytes(bom + b'[{"a": 1}]')
    cs = tmp_path / "c.csv"
    cs.write_bytes(bom + b"a,b\n1,2\n")
    assert _lines(read_records(str(jl))) == [(1, {"a": 1}), (2, {"a": 2})]
    assert _lines(read_records(str(js))) == [(1, {"a": 1})]
    assert _lines(read_records(str(cs))) == [(2, {"a": "1", "b": "2"})]  # no '\ufeffa' key


def test_read_file_directly(tmp_path: Path) -> None:
    p = tmp_path / "train.jsonl"
    p.write_text('{"a": 1}\n', encoding="utf-8")
    assert _lines(read_file(p)) == [(1, {"a": 1})]


# ----------------------------------------------------------------------------------------------------------------------
# Paths and globs


def test_missing_path_names_the_config_key(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.jsonl")
    msg = _error(expand_paths, missing)
    assert msg.startswith("data.train:")
    assert "file not found" in msg and missing in msg
    msg = _error(read_records, missing, "data.validation")
    assert msg.startswith("data.validation:")


def test_directory_given(tmp_path: Path) -> None:
    d = tmp_path / "data"
    d.mkdir()
    msg = _error(expand_paths, str(d))
    assert msg.startswith("data.train:")
    assert "is a directory" in msg and "*.jsonl" in msg


def test_glob_matching_nothing(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text("a\n1\n")
    pattern = str(tmp_path / "*.jsonl")
    msg = _error(expand_paths, pattern)
    assert msg.startswith("data.train:")
    assert "no file matches" in msg and pattern in msg


def test_empty_list_of_paths() -> None:
    msg = _error(expand_paths, [])
    assert msg.startswith("data.train:")
    assert "no files given" in msg


def test_glob_matching_several_files_reads_all_in_sorted_order(tmp_path: Path) -> None:
    for name, value in [("b.jsonl", 2), ("a.jsonl", 1), ("c.jsonl", 3)]:
        (tmp_path / name).write_text(json.dumps({"v": value}) + "\n" + json.dumps({"v": value * 10}) + "\n")
    (tmp_path / "sub").mkdir()  # directories matching the glob are ignored
    (tmp_path / "ignored.csv").write_text("v\n99\n")
    files = expand_paths(str(tmp_path / "*.jsonl"))
    assert [f.name for f in files] == ["a.jsonl", "b.jsonl", "c.jsonl"]
    records = read_records(str(tmp_path / "*.jsonl"))
    assert [(Path(r.file).name, r.line, r.row["v"]) for r in records] == [
        ("a.jsonl", 1, 1), ("a.jsonl", 2, 10), ("b.jsonl", 1, 2), ("b.jsonl", 2, 20), ("c.jsonl", 1, 3), ("c.jsonl", 2, 30),
    ]


def test_list_of_paths_and_globs_mixed_formats(tmp_path: Path) -> None:
    (tmp_path / "one.jsonl").write_text('{"v": "1"}\n')
    (tmp_path / "two.csv").write_text("v\n2\n")
    records = read_records([str(tmp_path / "two.csv"), str(tmp_path / "one.*")])
    assert [(Path(r.file).name, r.line, r.row) for r in records] == [("two.csv", 2, {"v": "2"}), ("one.jsonl", 1, {"v": "1"})]


def test_bad_file_inside_a_glob_is_named(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"v": 1}\n')
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"v": 1}\n{oops}\n')
    msg = _error(read_records, str(tmp_path / "*.jsonl"))
    assert msg.startswith(f"{bad}:2:")


# ----------------------------------------------------------------------------------------------------------------------
# Every malformed file: one line that starts with file:line (or file: when no line applies) and says what is wrong.

NON_UTF8 = b'{"a": 1}\n{"a": 2}\n{"a": "caf\xe9"}\n{"a": 4}\n'
BAD_BYTE_AT = NON_UTF8.index(b"\xe9")  # 28
BAD_FILES = [
    # (case, file name, content, line or None, what the message must say)
    ("jsonl-malformed-line", "train.jsonl", '{"a": 1}\n\n{"a": 2,}\n{"a": 3}\n', 3, ("malformed JSON", "fix or remove")),
    ("jsonl-non-object-line", "train.jsonl", '{"a": 1}\n["not", "an", "object"]\n', 2,
     ("expected a JSON object per line", "list")),
    ("json-array-malformed-element", "train.json", '[\n  {"a": 1},\n  {"a": 2},\n  {"a": 3,\n   "b": }\n]\n', 5,
     ("malformed JSON",)),
    ("json-array-non-object-element", "train.json", '[\n  {"a": 1},\n  "just a string"\n]\n', 3, ("object", "str")),
    ("json-array-not-closed", "train.json", '[\n  {"a": 1},\n', None, ("not closed",)),
    ("json-that-is-jsonl-bad-line", "train.json", '{"a": 1}\n{"a": 2}\n{"a": \n', 3, ("malformed JSON",)),
    ("json-rows-nested-under-a-key", "train.json", json.dumps({"data": [{"a": 1}]}), None, ("'data'", "top-level JSON list")),
    ("json-scalar-document", "train.json", "42\n", 1, ("int",)),
    ("json-malformed-object-document", "train.json", '{\n  "a": 1,\n  "b" 2\n}\n', 3, ("malformed JSON",)),
    ("csv-too-many-values", "train.csv", "a,b\n1,2\n1,2,3\n", 3, ("more values than header columns",)),
    ("csv-too-few-values", "train.csv", "a,b,c\n1,2,3\n4,5\n", 3, ("fewer values than header columns", "3 expected")),
    ("csv-header-empty-column-name", "train.csv", "a,,c\n1,2,3\n", 1, ("header",)),
    ("tsv-too-many-values", "train.tsv", "a\tb\n1\t2\t3\n", 2, ("more values",)),
    ("empty-jsonl", "train.jsonl", b"", None, ("empty",)),
    ("empty-json", "train.json", b"", None, ("empty",)),
    ("empty-csv", "train.csv", b"", None, ("empty",)),
    ("whitespace-only", "train.jsonl", "\n   \n\t\n", None, ("empty",)),
    ("binary", "train.jsonl", b'{"a": 1}\n\x00\x01\x02\x89PNG\x00\x00', None, ("binary",)),
    ("non-utf8-byte", "train.jsonl", NON_UTF8, 3, ("UTF-8", f"byte {BAD_BYTE_AT}")),
    ("non-utf8-after-bom", "train.jsonl", b'\xef\xbb\xbf{"a":1}\n\xff"a"\n', 2, ()),
    ("unsupported-suffix", "train.txt", '{"a": 1}\n', None, ("'.txt'", ".jsonl")),
]


@pytest.mark.parametrize("name, content, line, needed", [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_bad_file_names_file_line_and_problem(tmp_path: Path, name: str, content, line, needed) -> None:
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content, encoding="utf-8")
    msg = _error(read_records, str(p))
    assert msg.startswith(f"{p}:{line}:" if line is not None else f"{p}:")
    for text in needed:
        assert text in msg


# ----------------------------------------------------------------------------------------------------------------------
# Reading on past problems (data check, on_invalid: skip): every bad line recorded, every good line kept


def test_lenient_jsonl_records_every_bad_line_and_keeps_the_rest(tmp_path: Path) -> None:
    p = tmp_path / "train.jsonl"
    p.write_bytes(b'{"a": 1}\n{"a": \n[1]\n{"a": "caf\xe9"}\n\n{"a": 5}\n')
    problems: list = []
    records = list(read_file(p, problems))
    assert _lines(records) == [(1, {"a": 1}), (6, {"a": 5})]
    assert [(x.line, x.kind) for x in problems] == [(2, "json"), (3, "json"), (4, "encoding")]
    assert all(x.text.startswith(f"{p}:{x.line}: ") for x in problems)


def test_lenient_csv_keeps_good_rows_around_bad_ones(tmp_path: Path) -> None:
    p = tmp_path / "train.csv"
    p.write_bytes(b"a,b\n1,2\n3,4,5\n6\n7,8\n9,caf\xe9\n")
    problems: list = []
    records = list(read_file(p, problems))
    assert _lines(records) == [(2, {"a": "1", "b": "2"}), (5, {"a": "7", "b": "8"})]
    assert [(x.line, x.kind) for x in problems] == [(6, "encoding"), (3, "csv"), (4, "csv")]


def test_lenient_json_array_says_where_it_had_to_stop(tmp_path: Path) -> None:
    p = tmp_path / "train.json"
    p.write_text('[\n {"a": 1},\n {"a": },\n {"a": 3}\n]\n')
    problems: list = []
    assert _lines(read_file(p, problems)) == [(2, {"a": 1})]
    assert len(problems) == 1 and problems[0].line == 3 and "rows after it were not read" in problems[0].text


def test_an_overlong_line_is_reported_not_read(tmp_path: Path, monkeypatch) -> None:
    from tunelab.data import readers

    monkeypatch.setattr(readers, "MAX_LINE_BYTES", 1000)
    p = tmp_path / "train.jsonl"
    p.write_text('{"a": 1}\n{"a": "' + "x" * 5000 + '"}\n{"a": 3}\n')
    problems: list = []
    assert _lines(read_file(p, problems)) == [(1, {"a": 1}), (3, {"a": 3})]
    assert [(x.line, x.kind) for x in problems] == [(2, "too_big")]
    msg = _error(read_records, str(p))
    assert msg.startswith(f"{p}:2: line is longer than")


def test_lenient_file_level_problems_are_one_entry_each(tmp_path: Path) -> None:
    empty, binary = tmp_path / "empty.jsonl", tmp_path / "blob.jsonl"
    empty.write_text("")
    binary.write_bytes(b"\x00\x01\x02")
    problems: list = []
    assert read_records([str(empty), str(binary)], problems=problems) == []
    assert [(x.file, x.line, x.kind) for x in problems] == [(str(empty), None, "file"), (str(binary), None, "file")]
