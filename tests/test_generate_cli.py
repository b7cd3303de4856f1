"""`tunelab generate` and `tunelab chat` on a trained tiny run, through the CLI."""

from __future__ import annotations

import pytest
from conftest import run_config
from typer.testing import CliRunner

from tunelab import load_config, train
from tunelab.cli import app


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    from conftest import alpaca_rows, write_jsonl

    tmp = tmp_path_factory.mktemp("gen")
    train_file = write_jsonl(tmp / "train.jsonl", alpaca_rows())
    return train(load_config(run_config(tiny_model_dir, train_file, tmp / "run")), quiet=True).run_dir


def test_generate_prints_one_reply_per_prompt(tiny_run):
    res = CliRunner().invoke(app, ["generate", str(tiny_run), "-p", "Say something about the fox.", "-p", "Hi",
                                   "--max-new-tokens", "5"])
    assert res.exit_code == 0, res.output
    assert len(res.stdout.strip().splitlines()) >= 1


def test_generate_is_deterministic_when_greedy(tiny_run):
    args = ["generate", str(tiny_run), "-p", "Say something about the dog.", "--max-new-tokens", "6"]
    first, second = CliRunner().invoke(app, args), CliRunner().invoke(app, args)
    assert first.exit_code == 0 and first.stdout == second.stdout


def test_chat_session_reset_and_exit(tiny_run):
    res = CliRunner().invoke(app, ["chat", str(tiny_run), "--max-new-tokens", "4"], input="Hello\n/reset\nAgain\n/exit\n")
    assert res.exit_code == 0, res.output
    assert res.stdout.count("model> ") == 2
    assert "history cleared" in res.output


def test_generate_on_interrupted_run_says_how_to_resume(tiny_run, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text((tiny_run / "config.yaml").read_text())
    res = CliRunner().invoke(app, ["generate", str(broken), "-p", "hi"])
    assert res.exit_code == 2
    assert "no final model yet" in res.output and "--resume" in res.output


def test_version_flag():
    import tunelab

    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.strip() == f"tunelab {tunelab.__version__}"


def test_a_vanishing_temperature_is_greedy_not_an_overflow(tiny_run):
    """temperature 2.2e-309 (an API client's random case) divided the logits to inf and crashed sampling."""
    from tunelab.generate import generate, generation_kwargs, load_for_inference

    model, tokenizer = load_for_inference(tiny_run)
    assert generation_kwargs(tokenizer, 4, 2.2e-309, 1.0)["do_sample"] is False
    assert generation_kwargs(tokenizer, 4, 1e-3, 1.0)["do_sample"] is True
    tiny = generate(model, tokenizer, ["Say hi."], max_new_tokens=4, temperature=2.2e-309)
    assert tiny == generate(model, tokenizer, ["Say hi."], max_new_tokens=4, temperature=0.0)
