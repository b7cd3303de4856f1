"""Read rows from JSON, JSONL and CSV files, each row tagged with its file and line.

`read_records("data/*.jsonl")` yields `Record(file, line, row)`. A malformed line raises a `TunelabError` that names
`file:line`; nothing is skipped silently.
"""

from __future__ import annotations

import csv
import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv"}


@dataclass(frozen=True)
class Record:
    file: str
    line: int
    row: dict

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


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


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TunelabError(f"{path}: cannot read the file ({exc.strerror}); check its permissions") from None
    if b"\x00" in raw[:8192]:
        raise TunelabError(f"{path}: looks like a binary file, not text; give a JSON, JSONL or CSV file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        offset = exc.start + (3 if raw.startswith(b"\xef\xbb\xbf") else 0)  # utf-8-sig counts after the BOM
        line = raw[:offset].count(b"\n") + 1
        raise TunelabError(f"{path}:{line}: not valid UTF-8 (byte {offset}); re-save the file as UTF-8") from None
    if not text.strip():
        raise TunelabError(f"{path}: the file is empty; add rows or remove it from the data config")
    return text


def _jsonl(path: Path, text: str) -> Iterator[Record]:
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TunelabError(f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno}); fix or remove this line") from None
        if not isinstance(row, dict):
            raise TunelabError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
        yield Record(str(path), lineno, row)


def _json(path: Path, text: str) -> Iterator[Record]:
    stripped = text.lstrip()
    if not stripped.startswith("["):
        if stripped.startswith("{") and "\n{" in stripped.strip():
            yield from _jsonl(path, text)  # a .json file that is really JSON Lines
            return
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TunelabError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg}); fix the file") from None
        if isinstance(obj, dict):
            for key in ("data", "rows", "examples", "train"):
                if isinstance(obj.get(key), list):
                    raise TunelabError(f"{path}: rows are nested under '{key}'; save them as a top-level JSON list or JSONL")
            yield Record(str(path), 1, obj)
            return
        raise TunelabError(f"{path}:1: expected a JSON list of objects or JSON Lines, got {type(obj).__name__}")
    # Walk the array element by element so each row knows its line.
    decoder = json.JSONDecoder()
    idx = text.index("[") + 1
    line, counted = 1, 0
    n = len(text)
    while True:
        while idx < n and text[idx] in " \t\r\n,":
            idx += 1
        if idx >= n:
            raise TunelabError(f"{path}: the JSON list is not closed with ']'; the file may be truncated")
        if text[idx] == "]":
            return
        line += text.count("\n", counted, idx)
        counted = idx
        try:
            row, end = decoder.raw_decode(text, idx)
        except json.JSONDecodeError as exc:
            raise TunelabError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno}); fix this row") from None
        if not isinstance(row, dict):
            raise TunelabError(f"{path}:{line}: expected each list element to be an object, got {type(row).__name__}")
        yield Record(str(path), line, row)
        idx = end


def _csv(path: Path, text: str, delimiter: str) -> Iterator[Record]:
    reader = csv.DictReader(text.splitlines(keepends=True), delimiter=delimiter)
    header = reader.fieldnames or []
    if not header or any(not (h or "").strip() for h in header):
        raise TunelabError(f"{path}:1: the CSV header has empty column names; the first line must name every column")
    first = 2
    try:
        for row in reader:
            # line_num is where the row ended; quoted fields with newlines make it span several lines.
            first = reader.line_num - sum(v.count("\n") for v in row.values() if isinstance(v, str))
            if None in row:
                raise TunelabError(f"{path}:{first}: more values than header columns; quote fields that contain '{delimiter}'")
            if any(v is None for v in row.values()):
                raise TunelabError(f"{path}:{first}: fewer values than header columns ({len(header)} expected)")
            if any((v or "").strip() for v in row.values()):
                yield Record(str(path), first, {k.strip(): v for k, v in row.items()})
    except csv.Error as exc:
        raise TunelabError(f"{path}:{first}: malformed CSV ({exc}); check the quoting") from None


def read_file(path: Path) -> Iterator[Record]:
    """Yield the rows of one file; the layout comes from the suffix.

    Raises:
        TunelabError: unknown suffix, unreadable or binary file, bad encoding, malformed line.
    """
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise TunelabError(f"{path}: unsupported file type '{path.suffix}'; use .jsonl, .json or .csv")
    text = _read_text(path)
    if kind == "jsonl":
        return _jsonl(path, text)
    if kind == "json":
        return _json(path, text)
    return _csv(path, text, "," if kind == "csv" else "\t")


def read_records(spec: str | list[str], key: str = "data.train") -> list[Record]:
    """Read every row of every file the spec names."""
    records: list[Record] = []
    for path in expand_paths(spec, key):
        records.extend(read_file(path))
    return records
