"""`tunelab eval` on a tiny model: generation, classification and perplexity tasks, results JSON, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import write_jsonl
from test_cli_errors import user_error
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.evaluate.loglik import MCItem, score_items
from tunelab.evaluate.runner import EvalRequest, evaluate, load_eval_model

runner = CliRunner()


def sentiment_rows(n: int = 12) -> list[dict]:
    words = ["great", "awful", "fine", "broken", "lovely", "late"]
    return [{"prompt": f"Review: the lamp is {words[i % 6]} number {i}. Sentiment?",
             "response": "positive" if words[i % 6] in ("great", "fine", "lovely") else "negative"} for i in range(n)]


def test_generation_task_writes_metrics_and_samples(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = write_jsonl(tmp_path / "test.jsonl", sentiment_rows(6))
    out = tmp_path / "results.json"
    result = runner.invoke(app, ["eval", str(tiny_model_dir), "--data", str(data), "--output", str(out), "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    res = json.loads(out.read_text())["results"]["generation"]
    for key in ("exact_match", "bleu", "chrf", "rouge1", "rouge2", "rougeL"):
        assert isinstance(res[key], float), key
    assert res["n"] == 6 and len(res["samples"]) == 6
    assert res["samples"][0]["id"] == f"{data}:1" and res["samples"][0]["reference"] == "positive"
    assert "exact_match" in result.stdout


def test_loglik_classification_picks_the_highest_scoring_label(tmp_path: Path, tiny_model_dir: Path) -> None:
    rows = sentiment_rows(10)
    data = write_jsonl(tmp_path / "test.jsonl", rows)
    res = evaluate(EvalRequest(str(tiny_model_dir), data=str(data), classify=True, batch_size=3))["results"]["classification"]
    model, tokenizer = load_eval_model(str(tiny_model_dir))
    labels = ["negative", "positive"]
    contexts = [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False, add_generation_prompt=True)
                for r in rows]
    scores = score_items(model, tokenizer, [MCItem(c, labels, 0) for c in contexts])
    preds = [labels[s.index(max(s))] for s in scores]
    truth = [r["response"] for r in rows]
    assert res["accuracy"] == pytest.approx(sum(p == t for p, t in zip(preds, truth)) / len(rows))
    assert res["labels"] == labels and res["n"] == 10
    assert [e["predicted"] for e in res["errors"]] == [p for p, t in zip(preds, truth) if p != t]


def test_perplexity_is_exp_of_the_token_weighted_loss(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": "The quick brown fox jumps over the lazy dog."} for _ in range(3)])
    res = evaluate(EvalRequest(str(tiny_model_dir), perplexity=str(data)))["results"]["perplexity"]
    assert res["perplexity"] == pytest.approx(math.exp(res["loss"]), rel=1e-3)
    assert res["n"] == 3 and res["tokens"] > 0
    assert 1.0 < res["perplexity"] < 10_000  # a random 400-token model is near-uniform


def test_local_benchmark_file_scores_acc_and_acc_norm(tmp_path: Path, tiny_model_dir: Path) -> None:
    rows = [{"query": f"Question: is {w} a colour?\nAnswer:", "choices": ["yes", "no"], "gold": int(w == "dog")}
            for w in ["red", "blue", "dog", "green"]]
    bench = write_jsonl(tmp_path / "colours.jsonl", rows)
    out = tmp_path / "r.json"
    result = runner.invoke(app, ["eval", str(tiny_model_dir), "--benchmark", str(bench), "--output", str(out)])
    assert result.exit_code == 0, result.output
    res = json.loads(out.read_text())["results"]["colours"]
    assert res["n"] == 4 and 0.0 <= res["acc"] <= 1.0 and 0.0 <= res["acc_norm"] <= 1.0


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ([], "nothing to evaluate"),
        (["--data", "rows.jsonl", "--limit", "0"], "--limit: must be at least 1"),
        (["--data", "rows.jsonl", "--precision", "fp8"], "--precision: fp32 or bf16"),
        (["--data", "missing.jsonl"], "file not found"),
    ],
)
def test_eval_user_errors(tmp_path: Path, tiny_model_dir: Path, monkeypatch, args: list[str], fragment: str) -> None:
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "rows.jsonl", sentiment_rows(3))
    user_error(runner.invoke(app, ["eval", str(tiny_model_dir), *args]), fragment)


def test_eval_on_something_that_is_not_a_model(tmp_path: Path) -> None:
    rows = write_jsonl(tmp_path / "rows.jsonl", sentiment_rows(3))
    user_error(runner.invoke(app, ["eval", str(tmp_path / "nope"), "--data", str(rows)]), "nope")


def test_results_are_cached_per_model_task_and_settings(tmp_path: Path, tiny_model_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "test.jsonl", sentiment_rows(4))
    req = EvalRequest(str(tiny_model_dir), data=str(data), max_new_tokens=4, batch_size=2)
    first = evaluate(req)["results"]["generation"]
    second = evaluate(req)["results"]["generation"]
    assert (first["cached"], second["cached"]) == (False, True)
    assert {k: v for k, v in first.items() if k not in ("cached", "seconds")} == {
        k: v for k, v in second.items() if k not in ("cached", "seconds")}
    # Another setting or other data bytes: computed again.
    assert evaluate(EvalRequest(str(tiny_model_dir), data=str(data), max_new_tokens=5, batch_size=2))["results"]["generation"]["cached"] is False
    data.write_text(data.read_text().replace("number 0", "number zero"))
    assert evaluate(req)["results"]["generation"]["cached"] is False
    assert evaluate(req, cache=False)["results"]["generation"]["cached"] is False


@pytest.mark.parametrize(
    ("rows", "fragment"),
    [
        ([{"query": "Q: 1+1?\nA:", "choices": ["2", "3"], "gold": 5}], ":1: gold"),
        ([{"query": "Q: 1+1?\nA:", "choices": ["2"], "gold": 0}], ":1: choices"),
        ([{"query": "Q: 1+1?\nA:", "gold": 0}], "choices"),
    ],
)
def test_bad_benchmark_files_are_one_line_errors(tmp_path: Path, tiny_model_dir: Path, rows: list, fragment: str) -> None:
    bench = write_jsonl(tmp_path / "bench.jsonl", rows)
    user_error(runner.invoke(app, ["eval", str(tiny_model_dir), "--benchmark", str(bench)]), fragment)


def test_unknown_task_name_suggests_the_closest(tiny_model_dir: Path) -> None:
    user_error(runner.invoke(app, ["eval", str(tiny_model_dir), "--tasks", "arc_eazy"]), "arc_eazy", "arc_easy")


def test_sampled_generation_is_seeded(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = write_jsonl(tmp_path / "test.jsonl", sentiment_rows(3))
    req = EvalRequest(str(tiny_model_dir), data=str(data), max_new_tokens=6, temperature=1.0, seed=7)
    first = evaluate(req, cache=False)["results"]["generation"]["samples"]
    again = evaluate(req, cache=False)["results"]["generation"]["samples"]
    greedy = evaluate(EvalRequest(str(tiny_model_dir), data=str(data), max_new_tokens=6), cache=False)["results"]["generation"]
    assert first == again
    assert [s["prediction"] for s in first] != [s["prediction"] for s in greedy["samples"]]


def test_list_needs_no_target_and_a_typed_newline_in_prompt_is_a_newline(tmp_path: Path, tiny_model_dir: Path) -> None:
    listing = runner.invoke(app, ["eval", "--list"])
    assert listing.exit_code == 0 and "arc_easy" in listing.stdout.split() and "mmlu" in listing.stdout.split()
    user_error(runner.invoke(app, ["eval", "--tasks", "arc_easy"]), "TARGET")
    bench = write_jsonl(tmp_path / "b.jsonl", [{"query": "Is red a colour?", "choices": ["yes", "no"], "gold": 0}])
    out = tmp_path / "r.json"
    result = runner.invoke(app, ["eval", str(tiny_model_dir), "-b", str(bench), "--prompt", "Q: {query}\\nA:", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["settings"]["prompt"] == "Q: {query}\nA:"


def test_similarity_adds_the_minilm_score(tmp_path: Path, tiny_model_dir: Path) -> None:
    from tunelab.evaluate.metrics import embedding_similarity_unavailable_reason

    data = write_jsonl(tmp_path / "test.jsonl", sentiment_rows(2))
    res = evaluate(EvalRequest(str(tiny_model_dir), data=str(data), max_new_tokens=4, similarity=True), cache=False)
    value = res["results"]["generation"]["embedding_similarity"]
    if embedding_similarity_unavailable_reason() is None:
        assert isinstance(value, float) and -1.0 <= value <= 1.0
    else:
        assert value is None
    plain = evaluate(EvalRequest(str(tiny_model_dir), data=str(data), max_new_tokens=4), cache=False)
    assert "embedding_similarity" not in plain["results"]["generation"]
