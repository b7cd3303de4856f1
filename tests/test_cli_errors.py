"""Every bad input a user can give `tunelab` ends in exit code 2, one `error:` line, no traceback and no run directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import alpaca_rows, run_config, write_jsonl
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.errors import TunelabError

runner = CliRunner()


def write_config(tmp_path: Path, cfg: dict, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def train_cli(tmp_path: Path, cfg: dict, *args: str):
    return runner.invoke(app, ["train", str(write_config(tmp_path, cfg)), *args])


def user_error(result, *fragments: str) -> str:
    """Assert a clean user error (exit 2, one 'error:' line on stderr, nothing else) and return the message."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    msg = lines[0][len("error: "):]
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    return msg


@pytest.fixture()
def out_dir(tmp_path: Path) -> Path:
    return tmp_path / "out"


@pytest.fixture()
def train_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", alpaca_rows(8))


# ----------------------------------------------------------------------------------------------------------------------
# Data problems


def test_missing_data_file(tmp_path, tiny_model_dir, out_dir) -> None:
    missing = tmp_path / "nope.jsonl"
    result = train_cli(tmp_path, run_config(tiny_model_dir, missing, out_dir))
    msg = user_error(result, "data.train", "file not found", str(missing))
    assert msg.startswith("data.train: ")
    assert not out_dir.exists()


def test_malformed_jsonl_line(tmp_path, tiny_model_dir, out_dir) -> None:
    rows = alpaca_rows(4)
    data = write_jsonl(tmp_path / "train.jsonl", rows[:2] + ['{"instruction": "x", "output": '] + rows[2:])
    msg = user_error(train_cli(tmp_path, run_config(tiny_model_dir, data, out_dir)), "malformed JSON")
    assert msg.startswith(f"{data}:3: ")
    assert not out_dir.exists()


def test_missing_field(tmp_path, tiny_model_dir, out_dir) -> None:
    rows = alpaca_rows(4)
    del rows[2]["output"]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    msg = user_error(train_cli(tmp_path, run_config(tiny_model_dir, data, out_dir)), "missing field")
    assert msg.startswith(f"{data}:3: output: missing field")
    assert not out_dir.exists()


def test_wrong_field_type(tmp_path, tiny_model_dir, out_dir) -> None:
    rows = alpaca_rows(4)
    rows[1]["output"] = 42
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    msg = user_error(train_cli(tmp_path, run_config(tiny_model_dir, data, out_dir)))
    assert msg == f"{data}:2: output: expected a string, got int"
    assert not out_dir.exists()


def test_wrong_fields_for_the_configured_format(tmp_path, tiny_model_dir, out_dir) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "p", "response": "r"}])
    cfg = run_config(tiny_model_dir, data, out_dir, data={"format": "alpaca"})
    msg = user_error(train_cli(tmp_path, cfg))
    assert msg.startswith(f"{data}:1: instruction: missing field (format 'alpaca' needs instruction, output)")
    assert not out_dir.exists()


def test_unknown_data_layout(tmp_path, tiny_model_dir, out_dir) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "answer": "a"}])
    msg = user_error(train_cli(tmp_path, run_config(tiny_model_dir, data, out_dir)), "cannot tell the data format", "data.format")
    assert msg.startswith(f"{data}:1: ")
    assert not out_dir.exists()


def test_empty_conversation(tmp_path, tiny_model_dir, out_dir) -> None:
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    data = write_jsonl(tmp_path / "train.jsonl", [ok, ok, {"messages": []}])
    msg = user_error(train_cli(tmp_path, run_config(tiny_model_dir, data, out_dir)), "empty conversation")
    assert msg.startswith(f"{data}:3: messages: empty conversation")
    assert not out_dir.exists()


def test_bad_role(tmp_path, tiny_model_dir, out_dir) -> None:
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]}
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    data = write_jsonl(tmp_path / "train.jsonl", [good, bad])
    msg = user_error(train_cli(tmp_path, run_config(tiny_model_dir, data, out_dir)))
    assert msg == f"{data}:2: messages[1].role: bad role 'bot'; use one of system, user, assistant"
    assert not out_dir.exists()


def test_prompt_alone_longer_than_max_length(tmp_path, tiny_model_dir, out_dir) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "Write a haiku about autumn leaves falling slowly " * 4, "output": "ok"}])
    cfg = run_config(tiny_model_dir, data, out_dir, data={"max_length": 8})
    msg = user_error(train_cli(tmp_path, cfg), "data.max_length=8", "raise data.max_length or shorten the row")
    assert msg.startswith(f"{data}:1: the prompt alone is ")
    assert not out_dir.exists()


def test_prompt_too_long_on_a_later_row_names_that_row(tmp_path, tiny_model_dir, out_dir) -> None:
    rows = alpaca_rows(5)
    rows[3]["instruction"] = "The quick brown fox jumps over the lazy dog. " * 20
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    msg = user_error(train_cli(tmp_path, run_config(tiny_model_dir, data, out_dir)), "data.max_length=64")
    assert msg.startswith(f"{data}:4: the prompt alone is ")
    assert not out_dir.exists()


def test_bad_validation_file_names_data_validation(tmp_path, tiny_model_dir, train_file, out_dir) -> None:
    cfg = run_config(tiny_model_dir, train_file, out_dir, data={"validation": str(tmp_path / "val.jsonl")})
    msg = user_error(train_cli(tmp_path, cfg), "file not found")
    assert msg.startswith("data.validation: ")
    assert not out_dir.exists()


def test_error_text_with_square_brackets_is_printed_verbatim(tmp_path, tiny_model_dir, out_dir) -> None:
    pattern = str(tmp_path / "part[ab].jsonl")  # a glob character class that matches no file
    msg = user_error(train_cli(tmp_path, run_config(tiny_model_dir, Path(pattern), out_dir)), "no file matches")
    assert pattern in msg


# ----------------------------------------------------------------------------------------------------------------------
# Config problems


def test_unknown_config_key_suggests(tmp_path, tiny_model_dir, train_file, out_dir) -> None:
    cfg = run_config(tiny_model_dir, train_file, out_dir)
    cfg["training"]["learnign_rate"] = cfg["training"].pop("learning_rate")
    path = write_config(tmp_path, cfg)
    result = runner.invoke(app, ["train", str(path)])
    msg = user_error(result, "training.learnign_rate: unknown key; did you mean 'learning_rate'?")
    assert msg.startswith(f"{path}:")
    assert msg.split(":")[1].isdigit()  # file:line
    assert not out_dir.exists()


def test_unknown_key_in_an_override(tmp_path, tiny_model_dir, train_file, out_dir) -> None:
    path = write_config(tmp_path, run_config(tiny_model_dir, train_file, out_dir))
    result = runner.invoke(app, ["train", str(path), "training.epoch=1"])
    user_error(result, "training.epoch: unknown key; did you mean 'epochs'?")
    assert not out_dir.exists()


def test_override_without_equals(tmp_path, tiny_model_dir, train_file, out_dir) -> None:
    path = write_config(tmp_path, run_config(tiny_model_dir, train_file, out_dir))
    user_error(runner.invoke(app, ["train", str(path), "training.epochs"]), "override 'training.epochs': expected key.sub=value")
    assert not out_dir.exists()


def test_wrong_type(tmp_path, tiny_model_dir, train_file, out_dir) -> None:
    cfg = run_config(tiny_model_dir, train_file, out_dir, training={"batch_size": "eight"})
    user_error(train_cli(tmp_path, cfg), "training.batch_size", "'eight'")
    assert not out_dir.exists()


def test_missing_config_file(tmp_path) -> None:
    user_error(runner.invoke(app, ["train", str(tmp_path / "nope.yaml")]), "config file not found")


def test_invalid_yaml(tmp_path, out_dir) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  train: [a.jsonl\noutput: {dir: out}\n", encoding="utf-8")
    msg = user_error(runner.invoke(app, ["train", str(path)]), "invalid YAML")
    assert msg.startswith(f"{path}:3: ")


# ----------------------------------------------------------------------------------------------------------------------
# Model and method problems


def test_model_path_does_not_exist(tmp_path, train_file, out_dir) -> None:
    missing = tmp_path / "no-such-model"
    cfg = run_config(missing, train_file, out_dir)
    msg = user_error(train_cli(tmp_path, cfg), "does not exist")
    assert msg.startswith(f"model: '{missing}'")
    assert not out_dir.exists()


def test_model_dir_without_config_json(tmp_path, train_file, out_dir) -> None:
    not_a_model = tmp_path / "empty-model"
    not_a_model.mkdir()
    (not_a_model / "README.md").write_text("nothing here")
    msg = user_error(train_cli(tmp_path, run_config(not_a_model, train_file, out_dir)), "has no config.json")
    assert msg.startswith(f"model: '{not_a_model}'")
    assert not out_dir.exists()


def test_model_path_is_a_file_but_not_gguf(tmp_path, train_file, out_dir) -> None:
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\x00" * 16)
    user_error(train_cli(tmp_path, run_config(weights, train_file, out_dir)), "not a .gguf")
    assert not out_dir.exists()


def test_lora_target_modules_missing_from_the_model(tmp_path, tiny_model_dir, train_file, out_dir) -> None:
    cfg = run_config(tiny_model_dir, train_file, out_dir, method={"target_modules": ["nonexistent_proj"]})
    msg = user_error(train_cli(tmp_path, cfg), "nonexistent_proj", "q_proj")
    assert msg.startswith("method.target_modules: ")
    assert not out_dir.exists()


def test_freeze_more_blocks_than_the_model_has(tmp_path, tiny_model_dir, train_file, out_dir) -> None:
    cfg = run_config(tiny_model_dir, train_file, out_dir)
    cfg["method"] = {"name": "freeze", "train_top_blocks": 99}  # replace the lora section, not merge into it
    msg = user_error(train_cli(tmp_path, cfg))
    assert msg.startswith("method.train_top_blocks: 99 is more than the model's 2 blocks")
    assert not out_dir.exists()


def test_freeze_pattern_matching_no_parameter(tmp_path, tiny_model_dir, train_file, out_dir) -> None:
    cfg = run_config(tiny_model_dir, train_file, out_dir)
    cfg["method"] = {"name": "freeze", "train_top_blocks": 1, "train_modules": ["*.no_such_param*"]}
    user_error(train_cli(tmp_path, cfg), "method.train_modules: pattern '*.no_such_param*' matches no parameter")
    assert not out_dir.exists()


# ----------------------------------------------------------------------------------------------------------------------
# Run directory problems


def test_existing_output_dir_without_resume(tmp_path, tiny_model_dir, train_file, out_dir) -> None:
    out_dir.mkdir()
    keep = out_dir / "summary.json"  # a finished run
    (out_dir / "config.yaml").write_text("model: default")
    keep.write_text("an earlier run")
    msg = user_error(train_cli(tmp_path, run_config(tiny_model_dir, train_file, out_dir)), "already holds a run", "--resume")
    assert msg.startswith(f"output.dir: {out_dir}")
    assert sorted(p.name for p in out_dir.iterdir()) == ["config.yaml", "summary.json"]
    assert keep.read_text() == "an earlier run"


def test_output_dir_that_is_not_a_run_is_never_touched(tmp_path, tiny_model_dir, train_file, out_dir) -> None:
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("mine")
    cfg = run_config(tiny_model_dir, train_file, out_dir, output={"overwrite": True})
    msg = user_error(train_cli(tmp_path, cfg), "not a tunelab run")
    assert msg.startswith(f"output.dir: {out_dir}")
    assert (out_dir / "notes.txt").read_text() == "mine"


def test_resume_without_a_checkpoint(tmp_path, tiny_model_dir, train_file, out_dir) -> None:
    result = train_cli(tmp_path, run_config(tiny_model_dir, train_file, out_dir), "--resume")
    msg = user_error(result, "no complete checkpoint")
    assert msg.startswith("--resume: ")
    assert not out_dir.exists()


# ----------------------------------------------------------------------------------------------------------------------
# --debug, other verbs, help


def test_debug_lets_the_error_propagate(tmp_path, tiny_model_dir, out_dir) -> None:
    cfg = run_config(tiny_model_dir, tmp_path / "nope.jsonl", out_dir)
    result = runner.invoke(app, ["--debug", "train", str(write_config(tmp_path, cfg))])
    assert isinstance(result.exception, TunelabError)
    assert "file not found" in str(result.exception)
    assert result.exit_code != 0
    assert not out_dir.exists()
    # the next invocation without --debug is a clean exit 2 again
    user_error(runner.invoke(app, ["train", str(tmp_path / "run.yaml")]), "file not found")


def test_generate_on_a_directory_that_is_not_a_model(tmp_path) -> None:
    target = tmp_path / "somewhere"
    target.mkdir()
    (target / "notes.txt").write_text("hi")
    result = runner.invoke(app, ["generate", str(target), "--prompt", "hello"])
    user_error(result, str(target), "has no config.json")


def test_generate_on_a_run_without_a_final_model(tmp_path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("data: {train: a}\n")
    user_error(runner.invoke(app, ["generate", str(run), "--prompt", "hello"]), "no final model yet", "--resume")


@pytest.mark.parametrize(
    "args, words",
    [
        (["--temperature", "-1"], "--temperature: must be >= 0"),
        (["--top-p", "0"], "--top-p: must be in (0, 1]"),
        (["--top-p", "1.5"], "--top-p: must be in (0, 1]"),
        (["--max-new-tokens", "0"], "--max-new-tokens: must be at least 1"),
    ],
)
def test_generate_bad_sampling_options(tmp_path, tiny_model_dir, args, words) -> None:
    result = runner.invoke(app, ["generate", str(tiny_model_dir), "--prompt", "hello", *args])
    user_error(result, words)


def test_chat_bad_sampling_option(tiny_model_dir) -> None:
    user_error(runner.invoke(app, ["chat", str(tiny_model_dir), "--temperature", "-0.5"]), "--temperature")


@pytest.mark.parametrize("verb", ["train", "generate", "chat", "demo", "eval", "report"])
def test_help(verb: str) -> None:
    result = runner.invoke(app, [verb, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    assert f"tunelab {verb}" in result.output


def test_top_level_help_lists_the_verbs() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for verb in ("train", "generate", "chat", "demo"):
        assert verb in result.output


# ----------------------------------------------------------------------------------------------------------------------
# A real process


def test_real_process_exit_code_and_single_stderr_line(tmp_path) -> None:
    out = tmp_path / "out"
    cfg = {"data": {"train": "train.jsonl"}, "training": {"learnign_rate": 1e-3}, "output": {"dir": str(out)}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "CLICOLOR_FORCE", "PY_COLORS")}
    env.update(HF_HUB_OFFLINE="1", NO_COLOR="1")
    proc = subprocess.run(
        [sys.executable, "-m", "tunelab", "train", "bad.yaml"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: bad.yaml:")
    assert "training.learnign_rate: unknown key; did you mean 'learning_rate'?" in lines[0]
    assert proc.stdout == ""
    assert not out.exists()
