"""Property tests: whatever bytes a data file holds, reading it either yields rows or raises a one-line TunelabError
that names the file; it never crashes with another exception."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunelab.data.formats import to_examples
from tunelab.data.readers import read_records
from tunelab.errors import TunelabError

SUFFIXES = [".jsonl", ".json", ".csv", ".tsv"]
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)


def _check(path, fmt=None) -> None:
    try:
        records = read_records(str(path))
        if records:
            to_examples(records, fmt)
    except TunelabError as exc:
        text = str(exc)
        assert "\n" not in text and text
        assert str(path) in text or text.startswith(("the data files", "data.train"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=300), suffix=st.sampled_from(SUFFIXES))
def test_arbitrary_bytes_never_crash(tmp_path, raw, suffix):
    path = tmp_path / f"data{suffix}"
    path.write_bytes(raw)
    _check(path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(json_values, min_size=1, max_size=5),
       fmt=st.sampled_from([None, "alpaca", "prompt_response", "messages", "text"]))
def test_arbitrary_json_rows_never_crash(tmp_path, rows, fmt):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    _check(path, fmt)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.fixed_dictionaries({"instruction": st.text(min_size=1, max_size=30).filter(str.strip),
                                           "output": st.text(min_size=1, max_size=30).filter(str.strip)}),
                     min_size=1, max_size=6))
def test_valid_rows_are_never_lost(tmp_path, rows):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    examples, fmt = to_examples(read_records(str(path)), None)
    assert fmt == "alpaca" and len(examples) == len(rows)
    assert [e.messages[-1]["content"] for e in examples] == [r["output"] for r in rows]
