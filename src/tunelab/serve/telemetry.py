"""What the server records: Prometheus metrics (/metrics) and one JSONL line per request (`--log-dir`).

Metrics live in a registry of their own per app (no process-wide state), labelled by endpoint, model and status:
    tunelab_requests_total, tunelab_errors_total, tunelab_request_latency_seconds (histogram, until the last byte,
    so a streamed reply counts in full), tunelab_generated_tokens_total, tunelab_prompt_tokens_total,
    tunelab_batch_rows (rows per generation batch), tunelab_queue_depth.

Request log lines (`<log-dir>/requests-YYYY-MM-DD.jsonl`), read back by `tunelab monitor`:
    {"time", "id", "endpoint", "model", "status", "latency_ms", "client", "request": {messages|prompt, params},
     "response": {"choices": [{"text", "finish_reason"}]} or {"error": {...}}, "usage"}
`client` is a hash of the API key (or the caller's address), never the key. With PII scrubbing on, every string under
"request" and "response" goes through `tunelab.data.pii.PiiScrubber` before it is written.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from pathlib import Path

KNOWN_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


def endpoint_label(path: str) -> str:
    if path in KNOWN_ENDPOINTS:
        return path
    return "/v1/models/{model}" if path.startswith("/v1/models/") else "other"  # bounded label values


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        labels = ["endpoint", "model", "status"]
        self.requests = Counter("tunelab_requests", "HTTP requests answered", labels, registry=self.registry)
        self.errors = Counter("tunelab_errors", "HTTP requests answered with status >= 400", labels, registry=self.registry)
        self.latency = Histogram("tunelab_request_latency_seconds", "Time from request to last response byte", ["endpoint", "model"],
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=self.registry)
        self.generated = Counter("tunelab_generated_tokens", "Completion tokens generated", ["model"], registry=self.registry)
        self.prompt = Counter("tunelab_prompt_tokens", "Prompt tokens processed", ["model"], registry=self.registry)
        self.batch_rows = Histogram("tunelab_batch_rows", "Sequences per generation batch", buckets=(1, 2, 4, 8, 16, 32, 64),
                                    registry=self.registry)
        self.queue_depth = Gauge("tunelab_queue_depth", "Requests waiting for a generation batch", registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestLog:
    """Append-only JSONL request log, one file per UTC day; writes are serialized and flushed line by line."""

    def __init__(self, directory: Path | str, scrub_pii: bool = False) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._scrub = None
        if scrub_pii:
            from tunelab.data.pii import PiiScrubber

            scrubber = PiiScrubber()
            self._scrub = lambda text: scrubber(text)[0]
        self._lock = threading.Lock()

    def path(self) -> Path:
        return self.directory / f"requests-{dt.datetime.now(dt.timezone.utc):%Y-%m-%d}.jsonl"

    def write(self, entry: dict) -> None:
        if self._scrub is not None:
            from tunelab.data.pipeline import map_strings

            for key in ("request", "response"):
                if key in entry:
                    entry[key] = map_strings(entry[key], self._scrub)
        line = json.dumps(entry, ensure_ascii=False, default=str) + "\n"
        with self._lock, open(self.path(), "a", encoding="utf-8") as f:
            f.write(line)


def log_entry(request_id: str, endpoint: str, model: str | None, status: int, started: float, client: str | None,
              request: dict | None = None, response: dict | None = None, usage: dict | None = None) -> dict:
    entry = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"), "id": request_id, "endpoint": endpoint,
             "model": model, "status": status, "latency_ms": round((time.perf_counter() - started) * 1000, 1), "client": client}
    if request is not None:
        entry["request"] = request
    if response is not None:
        entry["response"] = response
    if usage is not None:
        entry["usage"] = usage
    return entry


class TelemetryMiddleware:
    """ASGI middleware: counts and times every response; logs /v1/ requests that no handler logged (the errors)."""

    def __init__(self, app, metrics: Metrics, log: RequestLog | None) -> None:
        self.app, self.metrics, self.log = app, metrics, log

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        status = 0
        error_body = bytearray()

        async def watch(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                if status >= 400 and len(error_body) < 4096:
                    error_body.extend(message.get("body", b""))
                if not message.get("more_body", False):
                    self._record(scope, state, status, started, bytes(error_body))
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            # No last byte sent: 499 when the client left mid-response (nginx's "client closed request"), else 500.
            self._record(scope, state, 499 if status else 500, started, b"")

    def _record(self, scope, state: dict, status: int, started: float, body: bytes) -> None:
        if state.get("recorded"):
            return
        state["recorded"] = True
        endpoint = endpoint_label(scope["path"])
        model = state.get("model") or ""
        self.metrics.requests.labels(endpoint, model, str(status)).inc()
        self.metrics.latency.labels(endpoint, model).observe(time.perf_counter() - started)
        if status >= 400:
            self.metrics.errors.labels(endpoint, model, str(status)).inc()
        if self.log is not None and scope["path"].startswith("/v1/") and not state.get("logged") and scope.get("method") == "POST":
            try:
                error = json.loads(body).get("error") if body else None
            except (ValueError, AttributeError):
                error = None
            self.log.write(log_entry(state.get("request_id") or "", endpoint, state.get("model"), status, started,
                                     state.get("client"), response={"error": error}))
