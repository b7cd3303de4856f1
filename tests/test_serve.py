"""`tunelab serve` on two tiny LoRA runs: the official openai client (chat, streaming, adapters), errors, auth, limits,
metrics, the request log, a small concurrent load test, a schemathesis run, and the CLI's startup errors."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import alpaca_rows, build_tiny_model, run_config, write_jsonl
from typer.testing import CliRunner

from tunelab import load_config, train
from tunelab.cli import app as cli_app
from tunelab.errors import TunelabError

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from tunelab.serve.app import BackgroundServer, ServeSettings, create_app
from tunelab.serve.models import ServedModels, parse_adapter_specs

KEY = "sk-test-0123456789"
REPO = Path(__file__).resolve().parents[1]


def train_run(model_dir: Path, tmp: Path, name: str, output: str) -> Path:
    rows = [dict(r, output=output.format(i=i)) for i, r in enumerate(alpaca_rows())]
    data = write_jsonl(tmp / f"{name}.jsonl", rows)
    cfg = run_config(model_dir, data, tmp / name, training={"max_steps": 8, "learning_rate": 5e-2, "eval_every": 1000,
                                                              "save_every": 1000})
    return train(load_config(cfg), quiet=True).run_dir


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("serve-runs")
    return {"fox": train_run(tiny_model_dir, tmp, "fox", "The fox is number {i}."),
            "hello": train_run(tiny_model_dir, tmp, "hello", "Hello! How can I help you today?")}


@pytest.fixture(scope="module")
def models(runs) -> ServedModels:
    return ServedModels.load(str(runs["fox"]), {"hello": str(runs["hello"])})


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve-logs")


@pytest.fixture(scope="module")
def server(models, log_dir):
    settings = ServeSettings(api_keys={KEY}, max_tokens_limit=64, log_dir=log_dir, scrub_pii=True, max_body_bytes=100_000)
    with BackgroundServer(create_app(models, settings)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(api_key=KEY, base_url=server.url + "/v1", max_retries=0, timeout=60)


def post(server, path: str, body=None, key: str | None = KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60, **kwargs)


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error["message"]


def expected_reply(target, prompt: str, max_tokens: int) -> str:
    from tunelab.generate import generate, load_for_inference

    model, tokenizer = load_for_inference(target)
    return generate(model, tokenizer, [prompt], max_new_tokens=max_tokens)[0]


PROMPT = "Say something about the fox."


# ----------------------------------------------------------------------------------------------------------------------
# The openai client


def test_models_lists_target_base_and_adapters(client):
    assert sorted(m.id for m in client.models.list().data) == ["base", "fox", "hello"]
    assert client.models.retrieve("hello").id == "hello"


def test_each_model_name_answers_like_its_own_run(client, runs, tiny_model_dir):
    replies = {}
    for name, target in (("fox", runs["fox"]), ("hello", runs["hello"]), ("base", tiny_model_dir)):
        response = client.chat.completions.create(model=name, messages=[{"role": "user", "content": PROMPT}], max_tokens=12,
                                                  temperature=0)
        replies[name] = response.choices[0].message.content
        assert response.model == name and response.object == "chat.completion"
        # Same chat template, same greedy tokens as `tunelab generate` on that run alone: the adapter switch is right.
        assert replies[name].strip() == expected_reply(target, PROMPT, 12)
        assert 0 < response.usage.completion_tokens <= 12
        assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    assert len(set(replies.values())) == 3, replies  # three different models, not one


def test_prompt_tokens_count_the_chat_template(client, runs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(runs["fox"] / "model")
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    response = client.chat.completions.create(model="fox", messages=[{"role": "user", "content": PROMPT}], max_tokens=2)
    assert response.usage.prompt_tokens == len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_streaming_matches_the_full_reply(client):
    messages = [{"role": "user", "content": PROMPT}]
    full = client.chat.completions.create(model="hello", messages=messages, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model="hello", messages=messages, max_tokens=10, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_stop_strings_cut_the_reply_in_both_modes(client):
    messages = [{"role": "user", "content": PROMPT}]
    full = client.chat.completions.create(model="fox", messages=messages, max_tokens=16, temperature=0).choices[0].message.content
    assert len(full) > 4, full
    stop = full[2:4]
    expected = full[: full.find(stop)]
    cut = client.chat.completions.create(model="fox", messages=messages, max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == expected and cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="fox", messages=messages, max_tokens=16, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected


def test_completions_with_n_and_several_prompts_and_seed(client):
    response = client.completions.create(model="base", prompt=["The quick", "Hello"], max_tokens=4, n=2, temperature=1.0, seed=5)
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert response.object == "text_completion" and response.usage.completion_tokens <= 16
    again = client.completions.create(model="base", prompt=["The quick", "Hello"], max_tokens=4, n=2, temperature=1.0, seed=5)
    assert [c.text for c in again.choices] == [c.text for c in response.choices]  # seeded: reproducible
    streamed = list(client.completions.create(model="base", prompt="The quick", max_tokens=4, temperature=0, stream=True))
    greedy = client.completions.create(model="base", prompt="The quick", max_tokens=4, temperature=0)
    assert "".join(c.choices[0].text for c in streamed) == greedy.choices[0].text


# ----------------------------------------------------------------------------------------------------------------------
# Errors: OpenAI-style bodies, never a 500


def test_auth_missing_and_wrong_key_are_401(server):
    assert_openai_error(post(server, "/v1/chat/completions", {"model": "fox"}, key=None), 401, "missing_api_key")
    assert_openai_error(post(server, "/v1/chat/completions", {"model": "fox"}, key="sk-wrong-key-000"), 401, "invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(api_key="sk-wrong", base_url=server.url + "/v1", max_retries=0).models.list()
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # /health and /metrics stay open


def test_unknown_model_is_404(client, server):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["code"] == "model_not_found" and "fox" in info.value.body["message"]
    assert_openai_error(httpx.get(server.url + "/v1/models/nope", headers={"Authorization": f"Bearer {KEY}"}), 404, "model_not_found")


@pytest.mark.parametrize("body,param", [
    ({"model": "fox", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, "max_tokens"),
    ({"model": "fox", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"model": "fox", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**12}, "max_tokens"),
    ({"model": "fox", "messages": [{"role": "user", "content": "hi"}], "temperature": 7}, "temperature"),
    ({"model": "fox", "messages": [{"role": "user", "content": "hi"}], "n": 0}, "n"),
    ({"model": "fox", "messages": []}, "messages"),
    ({"model": "fox", "messages": [{"role": "tool", "content": "hi"}]}, "messages[0].role"),
    ({"model": "fox", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "fox", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"model": "fox", "prompt": ""}, None),
])
def test_bad_parameters_are_400(server, body, param):
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    response = post(server, path, body)
    assert_openai_error(response, 400, param=param)


def test_malformed_json_and_non_object_bodies_are_400(server):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    message = assert_openai_error(httpx.post(server.url + "/v1/chat/completions", content=b'{"model": "fox",', headers=headers), 400)
    assert "JSON" in message
    assert_openai_error(httpx.post(server.url + "/v1/chat/completions", content=b"[1, 2]", headers=headers), 400)
    assert_openai_error(httpx.post(server.url + "/v1/chat/completions", content=b"\xff\xfe", headers=headers), 400)


def test_prompt_over_the_context_length_is_400(server, models):
    long_prompt = "fox " * (models.context_length + 10)
    message = assert_openai_error(post(server, "/v1/chat/completions", {"model": "fox", "messages": [{"role": "user", "content": long_prompt}]}),
                                  400, "context_length_exceeded", "messages")
    assert str(models.context_length) in message
    # A prompt that fits, but not with the completion asked for.
    assert_openai_error(post(server, "/v1/completions", {"model": "base", "prompt": "fox " * (models.context_length - 20),
                                                         "max_tokens": 60}), 400, "context_length_exceeded")


def test_request_over_the_size_limit_is_413(server):
    body = {"model": "fox", "messages": [{"role": "user", "content": "x" * 200_000}]}
    assert_openai_error(post(server, "/v1/chat/completions", body), 413, "request_too_large")
    # Also when the client streams the body without announcing its length.
    def chunks():
        yield b'{"model": "fox", "messages": [{"role": "user", "content": "'
        for _ in range(30):
            yield b"y" * 10_000
        yield b'"}]}'
    response = httpx.post(server.url + "/v1/chat/completions", content=chunks(), headers={"Authorization": f"Bearer {KEY}"})
    assert_openai_error(response, 413, "request_too_large")


def test_unknown_path_and_method_have_openai_error_bodies(server):
    assert_openai_error(httpx.get(server.url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"}), 404)
    assert_openai_error(httpx.get(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}), 405)


def test_rate_limit_per_key_is_429(models):
    other = "sk-other-0123456789"
    settings = ServeSettings(api_keys={KEY, other}, rate_limit=(3, 60.0))
    with BackgroundServer(create_app(models, settings)) as running:
        for _ in range(3):
            assert httpx.get(running.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        limited = httpx.get(running.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        assert_openai_error(limited, 429, "rate_limit_exceeded")
        assert int(limited.headers["retry-after"]) >= 1
        assert httpx.get(running.url + "/v1/models", headers={"Authorization": f"Bearer {other}"}).status_code == 200
        with pytest.raises(openai.RateLimitError):
            openai.OpenAI(api_key=KEY, base_url=running.url + "/v1", max_retries=0).models.list()


# ----------------------------------------------------------------------------------------------------------------------
# Metrics, request log, batching under load


def test_metrics_count_requests_errors_and_tokens(client, server):
    before = httpx.get(server.url + "/metrics").text
    client.chat.completions.create(model="hello", messages=[{"role": "user", "content": "metrics"}], max_tokens=3)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=[{"role": "user", "content": "x"}])
    text = httpx.get(server.url + "/metrics").text

    def value(metrics: str, line_start: str) -> float:
        found = [line.split()[-1] for line in metrics.splitlines() if line.startswith(line_start)]
        return float(found[0]) if found else 0.0

    ok = 'tunelab_requests_total{endpoint="/v1/chat/completions",model="hello",status="200"}'
    assert value(text, ok) == value(before, ok) + 1
    missing = 'tunelab_errors_total{endpoint="/v1/chat/completions",model="",status="404"}'
    assert value(text, missing) == value(before, missing) + 1
    assert value(text, 'tunelab_generated_tokens_total{model="hello"}') > value(before, 'tunelab_generated_tokens_total{model="hello"}')
    assert value(text, 'tunelab_request_latency_seconds_count{endpoint="/v1/chat/completions",model="hello"}') >= 1
    assert "tunelab_batch_rows_count" in text and "tunelab_queue_depth" in text


def test_requests_are_logged_as_jsonl_with_pii_scrubbed(client, log_dir):
    secret = "Mail jane.doe@example.com or call +1 415 555 2671 about the fox."
    response = client.chat.completions.create(model="fox", messages=[{"role": "user", "content": secret}], max_tokens=4)
    time.sleep(0.05)
    lines = [json.loads(line) for path in sorted(log_dir.glob("*.jsonl")) for line in path.read_text().splitlines()]
    entry = next(e for e in lines if e["id"] == response.id)
    assert entry["status"] == 200 and entry["model"] == "fox" and entry["endpoint"] == "/v1/chat/completions"
    content = entry["request"]["messages"][0]["content"]
    assert "jane.doe@example.com" not in content and "555 2671" not in content
    assert "<EMAIL>" in content and "<PHONE>" in content
    assert entry["usage"]["completion_tokens"] == response.usage.completion_tokens
    assert entry["response"]["choices"][0]["finish_reason"] == response.choices[0].finish_reason
    assert KEY not in json.dumps(lines) and entry["client"].startswith("key-")
    assert any(e["status"] == 401 and e["response"]["error"]["code"] for e in lines)  # errors are logged too


def load_bench_module():
    spec = importlib.util.spec_from_file_location("serve_load_bench", REPO / "bench" / "serve_load.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_concurrent_clients_get_batched_without_errors(server):
    bench = load_bench_module()
    result = asyncio.run(bench.run_load(server.url, "fox", clients=10, requests=3, max_tokens=4, api_key=KEY, timeout=60,
                                        stream_every=4))
    assert result.errors == [] and result.requests == 30
    assert result.completion_tokens > 0 and result.percentile(99) >= result.percentile(50) > 0
    assert httpx.get(server.url + "/health").json()["batches"]["largest"] > 1  # requests really shared batches


# ----------------------------------------------------------------------------------------------------------------------
# Schemathesis: generated requests against the OpenAPI schema never get a 5xx


def test_schemathesis_finds_no_server_errors(models):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    api = create_app(models, ServeSettings(max_tokens_limit=4, max_batch_rows=4))
    schema = schemathesis.openapi.from_asgi("/openapi.json", api)
    seen: list[int] = []

    @given(case=schema.as_strategy())
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case):
        response = case.call()
        seen.append(response.status_code)
        assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])

    check()
    assert len(seen) >= 30 and any(s == 200 for s in seen)


# ----------------------------------------------------------------------------------------------------------------------
# Startup errors: one line, exit 2


def one_line_error(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_cli_refuses_what_is_not_a_run_or_a_spec(tiny_model_dir, runs, tmp_path):
    runner = CliRunner()
    assert "does not exist" in one_line_error(runner.invoke(cli_app, ["serve", str(tmp_path / "missing")]))
    assert "not name=RUN_DIR" in one_line_error(runner.invoke(cli_app, ["serve", str(runs["fox"]), "--adapters", "legal"]))
    message = one_line_error(runner.invoke(cli_app, ["serve", str(runs["fox"]), "--adapters", f"x={tiny_model_dir}"]))
    assert "not a tunelab run directory" in message
    assert "is not a rate" in one_line_error(runner.invoke(cli_app, ["serve", str(runs["fox"]), "--rate-limit", "lots"]))
    assert "does not exist" in one_line_error(runner.invoke(cli_app, ["serve", str(runs["fox"]), "--api-keys-file", str(tmp_path / "k")]))
    assert "already taken" in one_line_error(runner.invoke(cli_app, ["serve", str(runs["fox"]), "--adapters", f"base={runs['hello']}"]))
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    (interrupted / "config.yaml").write_text((runs["fox"] / "config.yaml").read_text())
    assert "no final model yet" in one_line_error(runner.invoke(cli_app, ["serve", str(interrupted)]))
    assert "no final model yet" in one_line_error(runner.invoke(cli_app, ["serve", str(runs["fox"]), "--adapters", f"x={interrupted}"]))


def test_adapter_trained_on_another_base_is_refused(runs, tmp_path):
    other_base = tmp_path / "other-base"
    build_tiny_model(vocab_size=400, seed=1).save_pretrained(other_base)
    stranger = tmp_path / "stranger"
    shutil.copytree(runs["hello"], stranger)
    adapter_config = stranger / "model" / "adapter_config.json"
    config = json.loads(adapter_config.read_text())
    config["base_model_name_or_path"] = str(other_base)
    adapter_config.write_text(json.dumps(config))
    with pytest.raises(TunelabError, match="adapters must share the base model"):
        ServedModels.load(str(runs["fox"]), {"stranger": str(stranger)})


def test_api_keys_file_and_rate_limit_specs(tmp_path):
    from tunelab.serve.guards import load_api_keys, parse_rate_limit

    keys = tmp_path / "keys.txt"
    keys.write_text("# team keys\nsk-one\n\n  sk-two  \n")
    assert load_api_keys(["sk-cli"], keys) == {"sk-cli", "sk-one", "sk-two"}
    keys.write_text("# nothing\n")
    with pytest.raises(TunelabError, match="holds no key"):
        load_api_keys(None, keys)
    assert parse_rate_limit("60/min") == (60, 60.0) and parse_rate_limit("5 / s") == (5, 1.0) and parse_rate_limit(None) is None
    for bad in ("0/min", "60", "ten/min", "5/day"):
        with pytest.raises(TunelabError, match="--rate-limit"):
            parse_rate_limit(bad)


def test_adapter_specs_parse_and_reject():
    assert parse_adapter_specs(["a=runs/a", " b = runs/b "]) == {"a": "runs/a", "b": "runs/b"}
    for bad, fragment in ((["a=x", "a=y"], "given twice"), (["=x"], "not name=RUN_DIR"), (["a b=x"], "not a usable model name")):
        with pytest.raises(TunelabError, match=fragment):
            parse_adapter_specs(bad)


@pytest.mark.slow
def test_cli_serve_starts_answers_and_stops(tiny_model_dir, tmp_path):
    bench = load_bench_module()
    proc, url = bench._start_server(str(tiny_model_dir), ["--log-dir", str(tmp_path / "logs")], log=True,
                                    env={"TUNELAB_API_KEY": KEY})  # the key from the environment
    try:
        client = openai.OpenAI(api_key=KEY, base_url=url + "/v1", max_retries=0)
        assert [m.id for m in client.models.list().data] == [tiny_model_dir.name]
        reply = client.chat.completions.create(model=tiny_model_dir.name, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert reply.choices[0].finish_reason in ("stop", "length")
    finally:
        proc.terminate()
        proc.wait(15)
    assert list((tmp_path / "logs").glob("requests-*.jsonl"))
