"""`tunelab monitor`: drift of logged requests against the training data, the verdict and exit code, logs -> dataset."""

from __future__ import annotations

import itertools
import json
from importlib import resources
from pathlib import Path

import pytest
from conftest import write_jsonl
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.errors import TunelabError
from tunelab.serve.monitor import check_drift, emit_dataset, read_request_log
from tunelab.serve.telemetry import RequestLog, log_entry

DEMO = Path(str(resources.files("tunelab.demo") / "data"))


def demo_rows(split: str) -> list[dict]:
    return [json.loads(line) for line in (DEMO / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def shifted_prompts(n: int) -> list[str]:
    """Nothing like a support ticket: creative-writing and trivia requests."""
    asks = ["Write a short poem about", "Explain to a child how", "Give me three fun facts about", "Compose a limerick on"]
    topics = ["the moon landing", "photosynthesis works", "medieval castles", "jazz in New Orleans", "volcanoes erupting",
              "the history of chess", "black holes", "honey bees dancing"]
    return [f"{a} {t}, please." for a, t in itertools.islice(itertools.product(asks, topics), n)]


def write_log(directory: Path, prompts: list[str], model: str = "demo") -> Path:
    """Log lines exactly as `tunelab serve` writes them (same writer), plus an error and a corrupt line to skip."""
    log = RequestLog(directory)
    for i, prompt in enumerate(prompts):
        log.write(log_entry(f"chatcmpl-{i}", "/v1/chat/completions", model, 200, 0.0, "key-x",
                            {"messages": [{"role": "user", "content": prompt}], "max_tokens": 8},
                            {"choices": [{"text": f"reply {i}", "finish_reason": "stop"}]}, {"prompt_tokens": 3, "completion_tokens": 2}))
    log.write(log_entry("", "/v1/chat/completions", None, 401, 0.0, None, response={"error": {"code": "invalid_api_key"}}))
    with open(log.path(), "a", encoding="utf-8") as f:
        f.write("{corrupt\n")
    return directory


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("ref") / "train.jsonl", demo_rows("train")[:80])


@pytest.fixture(scope="module")
def in_distribution(tmp_path_factory) -> Path:
    return write_log(tmp_path_factory.mktemp("logs-in"), [r["prompt"] for r in demo_rows("test")[:30]])


@pytest.fixture(scope="module")
def shifted(tmp_path_factory) -> Path:
    return write_log(tmp_path_factory.mktemp("logs-shift"), shifted_prompts(30))


def test_read_request_log_keeps_successful_completions_only(in_distribution):
    notes: list[str] = []
    requests = read_request_log(str(in_distribution), notes=notes)
    assert len(requests) == 30 and requests[0].prompt_text().startswith("Extract the ticket")
    assert notes == ["1 log line(s) could not be read and were skipped"]
    assert len(read_request_log(str(in_distribution), last=5)) == 5
    assert read_request_log(str(in_distribution), model="other") == []


def test_drift_with_embeddings_flags_shifted_prompts_only(in_distribution, shifted, reference):
    # 20 logged prompts against 40 training prompts: small, so the MiniLM encoder has little to do on a 2-core machine.
    ok = check_drift(read_request_log(str(in_distribution), last=20), str(reference), max_reference=40)
    assert ok.verdict == "ok", [(s.name, s.score, s.p_value) for s in ok.signals]
    assert [s.name for s in ok.signals] == ["length", "vocabulary", "embedding"]
    embedding = ok.signals[2]
    if embedding.note is None:  # the MiniLM package is installed
        assert embedding.score < 0.3
    drift = check_drift(read_request_log(str(shifted), last=20), str(reference), max_reference=40)
    assert drift.verdict == "retrain" and drift.message.startswith("verdict: RETRAIN")
    assert {s.name for s in drift.signals if s.drifted} >= {"length", "vocabulary"}
    if drift.signals[2].note is None:
        assert drift.signals[2].drifted and drift.signals[2].detail["auc"] > 0.9
    assert drift.signals[1].detail["oov_rate"] > 0.3 and drift.signals[1].detail["top_unseen_words"]


def test_repeated_prompts_do_not_read_as_drift(tmp_path, reference):
    prompts = [r["prompt"] for r in demo_rows("test")[:20]]
    logs = write_log(tmp_path / "logs", prompts * 3)  # retries and popular questions
    report = check_drift(read_request_log(str(logs)), str(reference), embeddings=False)
    assert report.verdict == "ok" and report.requests == 20, [(s.name, s.score, s.p_value) for s in report.signals]


def test_cli_verdict_line_and_exit_code(in_distribution, shifted, reference):
    runner = CliRunner()
    ok = runner.invoke(app, ["monitor", str(in_distribution), "--reference", str(reference), "--no-embeddings"])
    assert ok.exit_code == 0, ok.output
    assert "verdict: OK" in ok.stdout
    drift = runner.invoke(app, ["monitor", str(shifted), "-r", str(reference), "--no-embeddings"])
    assert drift.exit_code == 1, drift.output
    assert "verdict: RETRAIN" in drift.stdout and "vocabulary" in drift.stdout
    as_json = runner.invoke(app, ["monitor", str(shifted), "-r", str(reference), "--no-embeddings", "--json"])
    report = json.loads(as_json.stdout)
    assert as_json.exit_code == 1 and report["verdict"] == "retrain" and report["requests"] == 30


def test_too_few_requests_gives_no_verdict(in_distribution, reference):
    res = CliRunner().invoke(app, ["monitor", str(in_distribution), "-r", str(reference), "--last", "5", "--no-embeddings"])
    assert res.exit_code == 0 and "not enough distinct prompts" in res.stdout


def test_emit_writes_a_messages_dataset_tunelab_can_train_on(shifted, tmp_path):
    from tunelab.data.pipeline import read_rows

    out = tmp_path / "review.jsonl"
    res = CliRunner().invoke(app, ["monitor", str(shifted), "--emit", str(out), "--last", "10"])
    assert res.exit_code == 0, res.output
    assert "wrote 10 request(s)" in res.stdout
    problems: list = []
    records, fmt = read_rows(str(out), "data.train", None, problems)
    assert fmt == "messages" and len(records) == 10 and problems == []
    first = records[0].row
    assert first["messages"][-1] == {"role": "assistant", "content": "reply 20"} and first["_source"].endswith(":21")
    written, skipped = emit_dataset([], tmp_path / "empty.jsonl")
    assert (written, skipped) == (0, 0)


def test_bad_inputs_are_one_line_errors(in_distribution, reference, tmp_path):
    runner = CliRunner()
    for args, fragment in (([str(tmp_path / "nothing"), "-r", str(reference)], "no request log found"),
                           ([str(in_distribution)], "--reference"),
                           ([str(in_distribution), "-r", str(reference), "--threshold", "2"], "--threshold"),
                           ([str(in_distribution), "-r", str(tmp_path / "missing.jsonl")], "missing.jsonl")):
        res = runner.invoke(app, ["monitor", *args, "--no-embeddings"])
        assert res.exit_code == 2, (args, res.output)
        assert fragment in res.stderr and "Traceback" not in res.output
    with pytest.raises(TunelabError, match="--alpha"):
        check_drift([], str(reference), alpha=0)
