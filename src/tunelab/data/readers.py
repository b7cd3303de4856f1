"""Read rows from JSON, JSONL and CSV files, each row tagged with its file and line.

`read_records("data/*.jsonl")` yields `Record(file, line, row)`. A malformed line raises a `TunelabError` that names
`file:line`; nothing is skipped silently. Given a `problems` list instead, every malformed line is recorded there as a
`Problem` and reading goes on with the next line (that is what `tunelab data check` and `on_invalid: skip` use).

JSON Lines files are streamed line by line, so a large file is never held in memory as one string, and a line over
`MAX_LINE_BYTES` is reported instead of read.
"""

from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv"}
MAX_LINE_BYTES = int(os.environ.get("TUNELAB_MAX_LINE_BYTES") or 64 * 2**20)
csv.field_size_limit(MAX_LINE_BYTES)


@dataclass(frozen=True)
class Record:
    file: str
    line: int
    row: dict

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the data: `text` is the whole one-line message, starting with `file:line:`."""

    file: str
    line: int | None
    text: str
    kind: str  # json | encoding | csv | file | too_big | format

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}" if self.line is not None else self.file

    def __str__(self) -> str:
        return self.text


def report(problems: list[Problem] | None, path: Path | str, line: int | None, message: str, kind: str) -> None:
    """Raise the problem (strict reading) or record it and carry on (`problems` given)."""
    text = f"{path}:{line}: {message}" if line is not None else f"{path}: {message}"
    if problems is None:
        raise TunelabError(text)
    problems.append(Problem(str(path), line, text, kind))


def expand_paths(spec: str | list[str], key: str = "data.train") -> list[Path]:
    """Expand a path, a glob or a list of them into existing files, in a stable (sorted) order.

    Raises:
        TunelabError: a path matches no file.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise TunelabError(f"{key}: no files given; set it to a path or glob such as data/train.jsonl")
    files: list[Path] = []
    for s in specs:
        if any(c in s for c in "*?["):
            matched = sorted(Path(p) for p in glob.glob(s, recursive=True) if Path(p).is_file())
            if not matched:
                raise TunelabError(f"{key}: no file matches '{s}'; check the pattern and the working directory")
            files.extend(matched)
        else:
            p = Path(s)
            if not p.exists():
                raise TunelabError(f"{key}: file not found: '{s}'; check the path (relative paths start at the working directory)")
            if p.is_dir():
                raise TunelabError(f"{key}: '{s}' is a directory; give a file or a glob such as '{s}/*.jsonl'")
            files.append(p)
    return files


def _looks_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\x00" in f.read(8192)


def _read_text(path: Path, problems: list[Problem] | None) -> str | None:
    """The whole file as text (JSON arrays and CSV need it). Lines that are not UTF-8 are reported; when reading on
    past problems, the rest of the file is decoded with those bytes replaced and `_drop_damaged` removes their rows."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        bom = 3 if raw.startswith(b"\xef\xbb\xbf") else 0
        offset = 0
        for lineno, line in enumerate(raw[bom:].split(b"\n"), start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                report(problems, path, lineno, f"not valid UTF-8 (byte {bom + offset + exc.start}); re-save the file as UTF-8",
                       "encoding")
            offset += len(line) + 1
        text = raw[bom:].decode("utf-8", errors="replace")
    if not text.strip():
        report(problems, path, None, "the file is empty; add rows or remove it from the data config", "file")
        return None
    return text


def _jsonl(path: Path, problems: list[Problem] | None) -> Iterator[Record]:
    """Stream a JSON Lines file; every bad line is one problem, the others are rows."""
    seen_any = False
    with open(path, "rb") as f:
        lineno = 0
        while raw := f.readline(MAX_LINE_BYTES + 1):
            lineno += 1
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass
                report(problems, path, lineno, f"line is longer than {MAX_LINE_BYTES // 2**20} MB; split the row or remove it",
                       "too_big")
                seen_any = True
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                report(problems, path, lineno, f"not valid UTF-8 (byte {f.tell() - len(raw) + exc.start}); "
                       "re-save the file as UTF-8", "encoding")
                seen_any = True
                continue
            if not line.strip():
                continue
            seen_any = True
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                report(problems, path, lineno, f"malformed JSON ({exc.msg} at column {exc.colno}); fix or remove this line", "json")
                continue
            if not isinstance(row, dict):
                report(problems, path, lineno, f"expected a JSON object per line, got {type(row).__name__}", "json")
                continue
            yield Record(str(path), lineno, row)
    if not seen_any:
        report(problems, path, None, "the file is empty; add rows or remove it from the data config", "file")


def _json(path: Path, problems: list[Problem] | None) -> Iterator[Record]:
    text = _read_text(path, problems)
    if text is None:
        return
    stripped = text.lstrip()
    if not stripped.startswith("["):
        if stripped.startswith("{") and "\n{" in stripped.strip():
            yield from _jsonl(path, problems)  # a .json file that is really JSON Lines
            return
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            report(problems, path, exc.lineno, f"malformed JSON ({exc.msg}); fix the file", "json")
            return
        if isinstance(obj, dict):
            for key in ("data", "rows", "examples", "train"):
                if isinstance(obj.get(key), list):
                    report(problems, path, None, f"rows are nested under '{key}'; save them as a top-level JSON list or JSONL", "file")
                    return
            yield Record(str(path), 1, obj)
            return
        report(problems, path, 1, f"expected a JSON list of objects or JSON Lines, got {type(obj).__name__}", "json")
        return
    # Walk the array element by element so each row knows its line.
    decoder = json.JSONDecoder()
    idx = text.index("[") + 1
    line, counted = 1, 0
    n = len(text)
    while True:
        while idx < n and text[idx] in " \t\r\n,":
            idx += 1
        if idx >= n:
            report(problems, path, None, "the JSON list is not closed with ']'; the file may be truncated", "json")
            return
        if text[idx] == "]":
            return
        line += text.count("\n", counted, idx)
        counted = idx
        try:
            row, end = decoder.raw_decode(text, idx)
        except json.JSONDecodeError as exc:
            # Inside one JSON document there is no reliable place to resume, so the rest of the file is not read.
            report(problems, path, exc.lineno, f"malformed JSON ({exc.msg} at column {exc.colno}); fix this row "
                   "(rows after it were not read)", "json")
            return
        if not isinstance(row, dict):
            report(problems, path, line, f"expected each list element to be an object, got {type(row).__name__}", "json")
        elif "\ufffd" not in json.dumps(row, ensure_ascii=False) or "\ufffd" not in text:
            yield Record(str(path), line, row)
        idx = end


def _csv(path: Path, problems: list[Problem] | None, delimiter: str) -> Iterator[Record]:
    text = _read_text(path, problems)
    if text is None:
        return
    damaged = "\ufffd" in text and problems is not None and any(p.kind == "encoding" and p.file == str(path) for p in problems)
    reader = csv.DictReader(text.splitlines(keepends=True), delimiter=delimiter)
    header = reader.fieldnames or []
    if not header or any(not (h or "").strip() for h in header):
        report(problems, path, 1, "the CSV header has empty column names; the first line must name every column", "csv")
        return
    first = 2
    try:
        for row in reader:
            # line_num is where the row ended; quoted fields with newlines make it span several lines.
            first = reader.line_num - sum(v.count("\n") for v in row.values() if isinstance(v, str))
            if None in row:
                report(problems, path, first, f"more values than header columns; quote fields that contain '{delimiter}'", "csv")
            elif any(v is None for v in row.values()):
                report(problems, path, first, f"fewer values than header columns ({len(header)} expected)", "csv")
            elif any((v or "").strip() for v in row.values()):
                if damaged and any("\ufffd" in (v or "") for v in row.values()):
                    continue  # its line is already reported as not UTF-8
                yield Record(str(path), first, {k.strip(): v for k, v in row.items()})
    except csv.Error as exc:
        report(problems, path, first, f"malformed CSV ({exc}); check the quoting (rows after it were not read)", "csv")


def read_file(path: Path, problems: list[Problem] | None = None) -> Iterator[Record]:
    """Yield the rows of one file; the layout comes from the suffix.

    With `problems` given, every malformed line is appended there and reading continues; otherwise the first one raises.

    Raises:
        TunelabError: unknown suffix, unreadable or binary file, bad encoding, malformed line (strict reading only).
    """
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        report(problems, path, None, f"unsupported file type '{path.suffix}'; use .jsonl, .json or .csv", "file")
        return iter(())
    try:
        binary = _looks_binary(path)
    except OSError as exc:
        report(problems, path, None, f"cannot read the file ({exc.strerror}); check its permissions", "file")
        return iter(())
    if binary:
        report(problems, path, None, "looks like a binary file, not text; give a JSON, JSONL or CSV file", "file")
        return iter(())
    if kind == "jsonl":
        return _jsonl(path, problems)
    if kind == "json":
        return _json(path, problems)
    return _csv(path, problems, "," if kind == "csv" else "\t")


def read_records(spec: str | list[str], key: str = "data.train", problems: list[Problem] | None = None) -> list[Record]:
    """Read every row of every file the spec names (see `read_file` for `problems`)."""
    records: list[Record] = []
    for path in expand_paths(spec, key):
        records.extend(read_file(path, problems))
    return records
