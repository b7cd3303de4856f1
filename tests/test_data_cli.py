"""`tunelab data check | prepare | preview` and the data side of `train`: every corrupted line named, exit codes,
files written, nothing half-done."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml
from conftest import run_config, write_csv, write_jsonl
from rich.console import Console
from test_cli_errors import user_error
from test_pipeline import qa_rows
from typer.testing import CliRunner

from tunelab import cli
from tunelab.cli import app
from tunelab.data.check import check_files

runner = CliRunner()


def corrupt_file(tmp_path: Path) -> tuple[Path, dict[int, str]]:
    """A JSONL file of 20 good rows with one of each problem planted; returns the path and {line: what}."""
    rows: list = [json.dumps(r) for r in qa_rows(20)]
    planted = {
        3: ('{"prompt": "broken", "response": ', "malformed JSON"),
        5: (json.dumps({"prompt": "where is the response?"}), "response: missing field"),
        7: (json.dumps({"prompt": "  \t ", "response": "x"}), "prompt: empty"),
        9: (json.dumps({"prompt": 42, "response": "x"}), "prompt: expected a string, got int"),
        11: (json.dumps(["a", "list"]), "expected a JSON object per line"),
    }
    for line, (text, _) in planted.items():
        rows[line - 1] = text
    rows.append(json.dumps(qa_rows(20)[0]))  # line 21 repeats line 1
    path = tmp_path / "train.jsonl"
    data = ("\n".join(rows) + "\n").encode()
    data += b'{"prompt": "caf\xe9", "response": "latin-1 byte"}\n'  # line 22: not UTF-8
    path.write_bytes(data)
    return path, {**{k: v[1] for k, v in planted.items()}, 22: "not valid UTF-8"}


def test_check_names_every_corrupted_line(tmp_path: Path) -> None:
    path, planted = corrupt_file(tmp_path)
    report = check_files([str(path)])
    assert [p.line for p in report.problems] == sorted(planted)
    for p in report.problems:
        assert p.text.startswith(f"{path}:{p.line}: ") and planted[p.line] in p.text, p.text
    assert report.duplicates == [(f"{path}:21", "exact", f"{path}:1")]
    assert (report.rows_read, report.rows_valid) == (22, 16)
    assert not report.clean


def test_check_reports_turn_order_problems_in_chats(tmp_path: Path) -> None:
    def conv(*roles: str) -> dict:
        return {"messages": [{"role": r, "content": f"{r} text {i}"} for i, r in enumerate(roles)]}

    path = write_jsonl(tmp_path / "chat.jsonl", [
        conv("system", "user", "assistant"),
        conv("user", "user", "assistant"),
        conv("assistant", "user", "assistant"),
        conv("user", "assistant", "system"),
        conv("user", "assistant", "assistant"),
    ])
    texts = [p.text for p in check_files([str(path)]).problems]
    assert texts == [
        f"{path}:2: messages[1]: two user turns in a row; merge them or add the missing assistant turn between them",
        f"{path}:3: messages[0]: the conversation starts with an assistant turn; start with a user turn (after an optional system message)",
        f"{path}:4: messages[2]: a system message must come first",
        f"{path}:5: messages[2]: two assistant turns in a row; merge them or add the missing user turn between them",
    ]


def test_check_measures_lengths_and_labels(tmp_path: Path, tiny_tokenizer) -> None:
    rows = qa_rows(30, label_every=10)
    rows[4]["response"] = "long answer " * 40
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    report = check_files([str(path)], tokenizer=tiny_tokenizer, max_length=128)
    assert [r for r, _ in report.too_long] == [f"{path}:5"]
    assert report.too_long[0][1] > 200
    assert report.clean  # long rows are a warning, not a problem
    assert report.label_field == "label" and report.labels == {"common": 27, "rare": 3}


def test_check_cli_exit_codes_and_json(tmp_path: Path, tiny_model_dir: Path) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", qa_rows(10))
    result = runner.invoke(app, ["data", "check", str(good), "--model", str(tiny_model_dir)])
    assert result.exit_code == 0, result.output
    assert "clean" in result.stdout and "10 rows read, 10 valid" in result.stdout

    bad, planted = corrupt_file(tmp_path)
    result = runner.invoke(app, ["data", "check", str(bad), "--model", "none"])
    assert result.exit_code == 2
    for line in planted:
        assert f"{bad}:{line}: " in result.stdout
    assert f"{bad}:21: exact duplicate of {bad}:1" in result.stdout

    result = runner.invoke(app, ["data", "check", str(bad), "--model", "none", "--json"])
    assert result.exit_code == 2
    report = json.loads(result.stdout)
    assert report["clean"] is False and [p["line"] for p in report["invalid"]] == sorted(planted)


def test_check_cli_reads_a_run_config_and_csv(tmp_path: Path, tiny_model_dir: Path) -> None:
    csv_path = write_csv(tmp_path / "train.csv", ["prompt", "response"], [["hi", "hello"], ["", "empty prompt"], ["a", "b"]])
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(tiny_model_dir), "data": {"train": str(csv_path)}}))
    result = runner.invoke(app, ["data", "check", str(cfg)])
    assert result.exit_code == 2
    assert f"{csv_path}:3: prompt: empty" in result.stdout


def test_check_cli_user_errors(tmp_path: Path) -> None:
    user_error(runner.invoke(app, ["data", "check", str(tmp_path / "nope.jsonl"), "--model", "none"]), "file not found")
    good = write_jsonl(tmp_path / "good.jsonl", qa_rows(3))
    user_error(runner.invoke(app, ["data", "check", str(good), "--format", "alpacca", "--model", "none"]), "unknown format 'alpacca'")


# ----------------------------------------------------------------------------------------------------------------------
# prepare and preview


def prepare_cfg(tmp_path: Path, model_dir: Path, train: Path, **data) -> Path:
    cfg = run_config(model_dir, train, tmp_path / "run")
    cfg["data"].update(data)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_prepare_writes_splits_reports_and_removed_rows(tmp_path: Path, tiny_model_dir: Path) -> None:
    rows = qa_rows(100, label_every=4)
    rows[10]["prompt"] += " Mail me: sam@example.com"
    path = write_jsonl(tmp_path / "train.jsonl", rows + [rows[3]])
    cfg = prepare_cfg(tmp_path, tiny_model_dir, path, clean=True, pii=["email"], dedupe=True, split={"stratify": "label"},
                      max_length=256)
    result = runner.invoke(app, ["data", "prepare", str(cfg)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "run" / "data"
    sizes = {s: len((out / f"{s}.jsonl").read_text().splitlines()) for s in ("train", "validation", "test")}
    assert sizes == {"train": 70, "validation": 15, "test": 15}
    train_rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert all("_source" in r for r in train_rows)
    assert "sam@example.com" not in (out / "train.jsonl").read_text() + (out / "validation.jsonl").read_text() + (out / "test.jsonl").read_text()
    removed = [json.loads(line) for line in (out / "removed_rows.jsonl").read_text().splitlines()]
    assert removed == [{"source": f"{path}:101", "step": "dedupe", "reason": f"exact duplicate of {path}:4"}]
    report = json.loads((out / "data_report.json").read_text())
    assert report["splits"] == sizes and report["labels"]["train"] == {"common": 52, "rare": 18}
    assert (out / "token_lengths.png").stat().st_size > 1000
    assert "Removed rows (1)" in (out / "data_report.html").read_text()
    assert "cache hit" not in result.stdout
    again = runner.invoke(app, ["data", "prepare", str(cfg)])
    assert again.exit_code == 0 and "cache hit" in again.stdout


def test_train_after_prepare_uses_the_same_directory_and_the_cache(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", qa_rows(40))
    cfg = prepare_cfg(tmp_path, tiny_model_dir, path, split=True)
    assert runner.invoke(app, ["data", "prepare", str(cfg)]).exit_code == 0
    result = runner.invoke(app, ["train", str(cfg), "-q"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data_cache_hit"] is True and summary["train_examples"] == 28 and summary["eval_examples"] == 6
    assert (tmp_path / "run" / "data" / "test.jsonl").is_file()
    # A trained run is never rewritten by prepare.
    user_error(runner.invoke(app, ["data", "prepare", str(cfg)]), "holds a trained run")


def test_train_with_on_invalid_skip_lists_skipped_rows_in_the_run(tmp_path: Path, tiny_model_dir: Path) -> None:
    bad, planted = corrupt_file(tmp_path)
    cfg = prepare_cfg(tmp_path, tiny_model_dir, bad, on_invalid="skip")
    result = runner.invoke(app, ["train", str(cfg), "-q"])
    assert result.exit_code == 0, result.output
    removed = [json.loads(line) for line in (tmp_path / "run" / "data" / "removed_rows.jsonl").read_text().splitlines()]
    assert [r["source"] for r in removed] == [f"{bad}:{line}" for line in sorted(planted)]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["train_examples"] == 16


def test_train_stops_on_invalid_rows_before_writing_anything(tmp_path: Path, tiny_model_dir: Path) -> None:
    bad, _ = corrupt_file(tmp_path)
    cfg = prepare_cfg(tmp_path, tiny_model_dir, bad)
    msg = user_error(runner.invoke(app, ["train", str(cfg)]), f"{bad}:3: malformed JSON", "5 more problems", "on_invalid: skip")
    assert "tunelab data check" in msg
    assert not (tmp_path / "run").exists()


def test_preview_highlights_trained_tokens(tmp_path: Path, tiny_model_dir: Path, monkeypatch) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", qa_rows(6))
    cfg = prepare_cfg(tmp_path, tiny_model_dir, path, max_length=256)
    plain = runner.invoke(app, ["data", "preview", str(cfg), "--n", "2"])
    assert plain.exit_code == 0, plain.output
    assert "Question 0: what is the colour" in plain.stdout and "Answer 1: it is" in plain.stdout
    assert "Question 2" not in plain.stdout and "<|im_start|>assistant" in plain.stdout
    # On a terminal the answer is styled as trained (bold green) and the question as context (dim).
    buffer = io.StringIO()
    monkeypatch.setattr(cli, "out", Console(file=buffer, force_terminal=True, color_system="standard", width=300))
    assert runner.invoke(app, ["data", "preview", str(cfg), "--n", "1"]).exit_code == 0
    styled = buffer.getvalue()
    assert "\x1b[1;32mAnswer 0: it is red 0." in styled
    assert "\x1b[2m<|im_start|>user" in styled


def test_preview_marks_packing_boundaries(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", qa_rows(6))
    cfg = prepare_cfg(tmp_path, tiny_model_dir, path, packing=True, max_length=256)
    result = runner.invoke(app, ["data", "preview", str(cfg), "--n", "1"])
    assert result.exit_code == 0, result.output
    assert "|next example|" in result.stdout


@pytest.mark.parametrize("verb", ["check", "prepare", "preview"])
def test_data_help(verb: str) -> None:
    result = runner.invoke(app, ["data", verb, "--help"])
    assert result.exit_code == 0 and f"tunelab data {verb}" in result.output


def test_a_csv_with_the_wrong_header_is_one_line_not_one_per_row(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = write_csv(tmp_path / "train.csv", ["question", "answer"], [["hi", "hello"], ["a", "b"], ["c", "d"]])
    report = check_files([str(path)], fmt="prompt_response")
    assert [p.text for p in report.problems] == [
        f"{path}:1: the header has no column 'prompt', 'response' (columns: question, answer); rename the column or set data.format"]
    cfg = prepare_cfg(tmp_path, tiny_model_dir, path, format="prompt_response")
    user_error(runner.invoke(app, ["train", str(cfg)]), f"{path}:1: the header has no column 'prompt'")
    # Without a format, the keys say no format fits.
    cfg = prepare_cfg(tmp_path, tiny_model_dir, path)
    user_error(runner.invoke(app, ["train", str(cfg)]), "cannot tell the data format from the keys ['answer', 'question']")
