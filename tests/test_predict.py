"""`tunelab predict`: one prediction per row in any format, the same text as `tunelab generate`, resumable output."""

from __future__ import annotations

import json

import pytest
from conftest import write_csv, write_jsonl
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.errors import TunelabError
from tunelab.serve import predict as predict_module
from tunelab.serve.predict import predict, read_predict_rows

ROWS = [
    {"instruction": "Say something about the fox.", "output": "The fox is number 1."},
    {"instruction": "Say something about the dog.", "input": "item 2"},  # no output: prompt only
    {"instruction": "What is the capital of France?", "output": "Paris."},
    {"instruction": "Write a haiku about autumn.", "system": "Be brief."},
    {"instruction": "Hello!", "output": "Hi."},
]


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture()
def rows_file(tmp_path):
    return write_jsonl(tmp_path / "rows.jsonl", ROWS)


def test_predictions_match_generate_and_keep_the_row(tiny_model_dir, rows_file, tmp_path):
    from tunelab.generate import generate, load_for_inference

    out = tmp_path / "preds.jsonl"
    summary = predict(str(tiny_model_dir), str(rows_file), out, batch_size=1, max_new_tokens=6, quiet=True)
    assert (summary.rows, summary.predicted, summary.skipped) == (5, 5, 0)
    got = lines(out)
    assert [r["instruction"] for r in got] == [r["instruction"] for r in ROWS]  # input order, fields kept
    assert [r["_input"] for r in got] == [f"{rows_file}:{i}" for i in range(1, 6)]
    assert [r.get("reference") for r in got] == ["The fox is number 1.", None, "Paris.", None, "Hi."]
    model, tokenizer = load_for_inference(tiny_model_dir)
    conversations = [[{"role": "user", "content": "Say something about the dog.\n\nitem 2"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a haiku about autumn."}]]
    assert [got[1]["prediction"], got[3]["prediction"]] == generate(model, tokenizer, conversations, max_new_tokens=6,
                                                                         batch_size=1)


def test_rerun_resumes_after_a_kill_and_matches_an_uninterrupted_run(tiny_model_dir, rows_file, tmp_path, monkeypatch):
    full = tmp_path / "full.jsonl"
    predict(str(tiny_model_dir), str(rows_file), full, batch_size=2, max_new_tokens=5, quiet=True)

    calls = []
    real = predict_module._generate

    def dies_on_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # like Ctrl-C or a kill between batches
        return real(*args, **kwargs)

    monkeypatch.setattr(predict_module, "_generate", dies_on_third_batch)
    partial = tmp_path / "partial.jsonl"
    with pytest.raises(KeyboardInterrupt):
        predict(str(tiny_model_dir), str(rows_file), partial, batch_size=2, max_new_tokens=5, quiet=True)
    assert len(lines(partial)) == 4  # two flushed batches survived
    with open(partial, "a", encoding="utf-8") as f:
        f.write('{"instruction": "half a li')  # a kill in the middle of a write
    monkeypatch.setattr(predict_module, "_generate", real)
    summary = predict(str(tiny_model_dir), str(rows_file), partial, batch_size=2, max_new_tokens=5, quiet=True)
    assert (summary.skipped, summary.predicted) == (4, 1)
    assert lines(partial) == lines(full)
    again = predict(str(tiny_model_dir), str(rows_file), partial, batch_size=2, max_new_tokens=5, quiet=True)
    assert again.predicted == 0 and lines(partial) == lines(full)


def test_changed_input_rows_are_refused_on_resume(tiny_model_dir, rows_file, tmp_path):
    out = tmp_path / "preds.jsonl"
    predict(str(tiny_model_dir), str(rows_file), out, max_new_tokens=2, quiet=True)
    write_jsonl(rows_file, [dict(ROWS[0], instruction="Something else.")] + ROWS[1:])
    with pytest.raises(TunelabError, match="different version of"):
        predict(str(tiny_model_dir), str(rows_file), out, max_new_tokens=2, quiet=True)


def test_every_format_becomes_a_prompt(tmp_path):
    csv = write_csv(tmp_path / "p.csv", ["prompt", "response"], [["Hi there", ""], ["2+2?", "4"]])
    items, fmt = read_predict_rows(str(csv))
    assert fmt == "prompt_response" and [i.reference for i in items] == [None, "4"]
    assert items[0].messages == [{"role": "user", "content": "Hi there"}]
    chat = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]},
                                              {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}])
    items, fmt = read_predict_rows(str(chat))
    assert fmt == "messages" and items[0].messages[-1] == {"role": "user", "content": "Q"} and items[1].reference == "A"
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "The quick brown fox"}])
    items, fmt = read_predict_rows(str(text))
    assert fmt == "text" and items[0].text == "The quick brown fox" and items[0].messages is None


def test_text_rows_are_continued_without_a_chat_template(tiny_model_dir, tmp_path):
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "The quick brown fox"}, {"text": "Hello! How"}])
    out = tmp_path / "o.jsonl"
    predict(str(tiny_model_dir), str(text), out, max_new_tokens=3, quiet=True)
    assert [isinstance(r["prediction"], str) for r in lines(out)] == [True, True]


def test_bad_rows_and_options_are_one_line_errors(tiny_model_dir, tmp_path):
    runner = CliRunner()
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"instruction": "ok", "output": "x"}', "{not json"])
    res = runner.invoke(app, ["predict", str(tiny_model_dir), "--input", str(bad), "--output", str(tmp_path / "o.jsonl")])
    assert res.exit_code == 2 and "bad.jsonl:2" in res.stderr and "Traceback" not in res.output
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"question": "?"}])
    res = runner.invoke(app, ["predict", str(tiny_model_dir), "-i", str(odd), "-o", str(tmp_path / "o.jsonl")])
    assert res.exit_code == 2 and "cannot tell the data format" in res.stderr
    res = runner.invoke(app, ["predict", str(tiny_model_dir), "-i", str(tmp_path / "none.jsonl"), "-o", str(tmp_path / "o.jsonl")])
    assert res.exit_code == 2 and "none.jsonl" in res.stderr
    good = write_jsonl(tmp_path / "good.jsonl", ROWS[:1])
    res = runner.invoke(app, ["predict", str(tiny_model_dir), "-i", str(good), "-o", str(tmp_path / "o.jsonl"), "--batch-size", "0"])
    assert res.exit_code == 2 and "--batch-size" in res.stderr
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"something": 1}\n')
    res = runner.invoke(app, ["predict", str(tiny_model_dir), "-i", str(good), "-o", str(foreign)])
    assert res.exit_code == 2 and "not a line tunelab predict wrote" in res.stderr


def test_cli_predict_writes_and_resumes(tiny_model_dir, rows_file, tmp_path):
    out = tmp_path / "cli.jsonl"
    args = ["predict", str(tiny_model_dir), "-i", str(rows_file), "-o", str(out), "--max-new-tokens", "3", "-q"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "wrote 5 prediction(s)" in first.stdout and len(lines(out)) == 5
    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0 and "wrote 0 prediction(s)" in second.stdout and "(5 already there)" in second.stdout
