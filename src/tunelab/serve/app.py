"""The OpenAI-compatible HTTP API: /v1/models, /v1/chat/completions, /v1/completions, /health, /metrics.

    models = ServedModels.load("runs/demo", adapters={"legal": "runs/legal"})
    app = create_app(models, ServeSettings(api_keys={"sk-local"}, rate_limit=(60, 60.0)))
    run_server(app, host="127.0.0.1", port=8000)                 # what `tunelab serve` does
    with BackgroundServer(app) as server: ... server.url ...      # tests: uvicorn in a thread on a free port

A request is validated (pydantic; errors are 400s with OpenAI's error body, never a traceback), its prompt rendered
with the model's own chat template exactly as `tunelab generate` does, checked against the token limits and the
context length, and queued for the batch worker. Streaming answers are server-sent events (`data: {chunk}` lines,
then `data: [DONE]`), fed by the worker as tokens are generated.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunelab.serve import protocol as p
from tunelab.serve.batching import BatchWorker, Job, QueueFull
from tunelab.serve.generation import RowSpec
from tunelab.serve.guards import GuardMiddleware, RateLimiter
from tunelab.serve.models import ServedModels
from tunelab.serve.protocol import ApiError
from tunelab.serve.telemetry import Metrics, RequestLog, TelemetryMiddleware, log_entry


@dataclass
class ServeSettings:
    api_keys: set[str] = field(default_factory=set)  # empty: no authentication
    rate_limit: tuple[int, float] | None = None  # (requests, seconds) per key, or per client address without keys
    max_tokens_limit: int = 2048  # the most tokens one request may ask for (400 above)
    max_body_bytes: int = 1_000_000  # 413 above
    max_batch_rows: int = 16
    batch_wait_ms: float = 5.0
    max_queue: int = 1024  # 503 above
    log_dir: Path | None = None  # None: no request log
    scrub_pii: bool = False


class Server:
    """Everything one app holds: the models, the batch worker, metrics and the request log."""

    def __init__(self, models: ServedModels, settings: ServeSettings) -> None:
        self.models = models
        self.settings = settings
        self.metrics = Metrics()
        self.worker = BatchWorker(models.generate, settings.max_batch_rows, settings.batch_wait_ms, settings.max_queue,
                                  on_batch=self.metrics.batch_rows.observe)
        self.metrics.queue_depth.set_function(self.worker.depth)
        self.log = RequestLog(settings.log_dir, settings.scrub_pii) if settings.log_dir is not None else None
        self.started = int(time.time())


def create_app(models: ServedModels, settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    server = Server(models, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        server.worker.close()

    app = FastAPI(title="tunelab serve", version="1", lifespan=lifespan,
                  description="OpenAI-compatible chat and text completions for tunelab models and LoRA adapters.")
    app.state.server = server
    bearer = [Security(HTTPBearer(auto_error=False))] if settings.api_keys else []  # documents the scheme; GuardMiddleware checks

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = p.validation_message(list(exc.errors()))
        return JSONResponse(p.error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}" if exc.status_code in (404, 405) else str(exc.detail)
        return JSONResponse(p.error_body(message, code=code), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:  # a bug: answer cleanly, keep the traceback here
        traceback.print_exception(exc, file=sys.stderr)
        return JSONResponse(p.error_body("The server had an error while processing your request.", "server_error"), status_code=500)

    @app.get("/health", tags=["ops"])
    async def health() -> dict:
        stats = server.worker.stats
        return {"status": "ok", "models": models.names(), "queue_depth": server.worker.depth(),
                "batches": {"count": stats.batches, "rows": stats.rows, "largest": stats.largest}}

    @app.get("/metrics", tags=["ops"])
    async def metrics() -> Response:
        body, content_type = server.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", tags=["openai"], dependencies=bearer)
    async def list_models() -> dict:
        return {"object": "list", "data": [_model_card(server, name) for name in models.names()]}

    @app.get("/v1/models/{model:path}", tags=["openai"], dependencies=bearer)  # names may contain "/"
    async def get_model(model: str) -> dict:
        if models.get(model) is None:
            raise _unknown_model(server, model)
        return _model_card(server, model)

    @app.post("/v1/chat/completions", tags=["openai"], dependencies=bearer)
    async def chat_completions(body: p.ChatCompletionRequest, request: Request):
        return await _complete(server, request, body, chat=True)

    @app.post("/v1/completions", tags=["openai"], dependencies=bearer)
    async def completions(body: p.CompletionRequest, request: Request):
        return await _complete(server, request, body, chat=False)

    default_openapi = app.openapi

    def openapi_with_model_names() -> dict:  # the schema names the models this server has (docs, clients, fuzzers)
        if app.openapi_schema is None:
            schema = default_openapi()
            for body in ("ChatCompletionRequest", "CompletionRequest"):
                schema["components"]["schemas"][body]["properties"]["model"]["enum"] = models.names()
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi_with_model_names
    limiter = RateLimiter(*settings.rate_limit) if settings.rate_limit else None
    app.add_middleware(GuardMiddleware, keys=settings.api_keys, limiter=limiter, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(TelemetryMiddleware, metrics=server.metrics, log=server.log)  # added last = outermost: sees every status
    return app


def _model_card(server: Server, name: str) -> dict:
    served = server.models.get(name)
    return {"id": name, "object": "model", "created": server.started, "owned_by": "tunelab",
            "root": served.source, "parent": None if served.adapter is None else "base"}


def _unknown_model(server: Server, name: str) -> ApiError:
    return ApiError(404, f"The model '{name}' does not exist; this server has: {', '.join(server.models.names())}.",
                    param="model", code="model_not_found")


# ----------------------------------------------------------------------------------------------------------------------
# Completions


async def _complete(server: Server, request: Request, body: p.ChatCompletionRequest | p.CompletionRequest, chat: bool):
    started = time.perf_counter()
    rid = p.new_id("chatcmpl" if chat else "cmpl")
    request.state.request_id = rid
    try:
        job, prompt_tokens, queue = _prepare(server, request, body, chat)
    except ApiError:
        raise
    except Exception as exc:  # noqa: BLE001  (a bug in rendering or tokenizing must not leak a traceback to the client)
        traceback.print_exception(exc, file=sys.stderr)
        raise ApiError(500, "The server had an error while processing your request.", "server_error") from None
    server.metrics.prompt.labels(body.model).inc(prompt_tokens)
    logged_request = _logged_request(body, chat)

    def finish(results: list | None, status: int, error: dict | None = None) -> None:
        request.state.logged = True
        completion_tokens = sum(r.completion_tokens for r in results) if results else 0
        server.metrics.generated.labels(body.model).inc(completion_tokens)
        if server.log is not None:
            response = {"choices": [{"text": r.text, "finish_reason": r.finish_reason} for r in results]} if results else {"error": error}
            server.log.write(log_entry(rid, request.url.path, body.model, status, started, getattr(request.state, "client", None),
                                       logged_request, response, p.usage(prompt_tokens, completion_tokens) if results else None))

    if body.stream:
        return StreamingResponse(_stream(server, body, chat, rid, job, queue, prompt_tokens, finish), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        results = await asyncio.wrap_future(job.future)
    except asyncio.CancelledError:
        job.cancel()
        raise
    except Exception as exc:  # noqa: BLE001  (generation failed: the worker's exception, reported without a traceback)
        traceback.print_exception(exc, file=sys.stderr)
        finish(None, 500, {"message": f"generation failed: {type(exc).__name__}"})
        raise ApiError(500, f"Generation failed ({type(exc).__name__}); the server log has the details.", "server_error") from None
    finish(results, 200)
    build = p.chat_response if chat else p.completion_response
    return JSONResponse(build(rid, body.model, results, prompt_tokens))


def _prepare(server: Server, request: Request, body, chat: bool) -> tuple[Job, int, asyncio.Queue | None]:
    """Validate the request against the model and the limits, tokenize it, queue it; returns (job, prompt tokens, queue)."""
    served = server.models.get(body.model)
    if served is None:
        raise _unknown_model(server, body.model)
    request.state.model = body.model
    unsupported = body.unsupported_field()
    if unsupported:
        raise ApiError(400, f"{unsupported}: not supported by tunelab serve; leave it out", param=unsupported, code="unsupported_parameter")
    tokenizer = served.tokenizer
    if chat:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001  (jinja TemplateError: the template refuses this conversation, e.g. role order)
            raise ApiError(400, f"messages: the model's chat template refused this conversation ({str(exc)[:200]})",
                           param="messages") from None
        prompts = [tokenizer(text, add_special_tokens=False)["input_ids"]]
        max_tokens, param = body.max_completion_tokens or body.max_tokens, "messages"
    else:
        texts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        prompts = [tokenizer(t)["input_ids"] for t in texts]
        max_tokens, param = body.max_tokens, "prompt"
    if any(not ids for ids in prompts):
        raise ApiError(400, f"{param}: empty prompt; give at least one token of text", param=param)
    limit, context = server.settings.max_tokens_limit, server.models.context_length
    if max_tokens is not None and max_tokens > limit:
        raise ApiError(400, f"max_tokens: {max_tokens} is more than this server allows ({limit})", param="max_tokens",
                       code="invalid_value")
    longest = max(len(ids) for ids in prompts)
    if longest >= context or (max_tokens is not None and longest + max_tokens > context):
        asked = f"{longest + (max_tokens or 1)} tokens ({longest} in the {param}, {max_tokens or 1} in the completion)"
        raise ApiError(400, f"This model's maximum context length is {context} tokens. However, you requested {asked}. "
                       f"Please reduce the length of the {param} or the completion.", param=param, code="context_length_exceeded")
    max_tokens = max_tokens or min(limit, context - longest)
    n = body.n or 1
    queue: asyncio.Queue | None = asyncio.Queue() if body.stream else None
    rows = []
    for ids in prompts:
        for _ in range(n):
            rows.append(RowSpec(ids, max_tokens, body.stop_strings(), on_text=_feeder(queue, len(rows)) if queue else None))
    temperature = 1.0 if body.temperature is None else body.temperature
    job = Job(body.model, rows, temperature, 1.0 if body.top_p is None else body.top_p, body.seed)
    if queue is not None:
        job.future.add_done_callback(_feeder(queue, None))
    try:
        server.worker.submit(job)
    except QueueFull:
        raise ApiError(503, "The server is overloaded with requests; retry shortly.", "server_error", code="overloaded",
                       headers={"retry-after": "1"}) from None
    return job, sum(len(ids) for ids in prompts), queue


def _feeder(queue: asyncio.Queue, index: int | None):
    """A callback for the worker thread that hands (row, text) to the request's event loop; None marks the end."""
    loop = asyncio.get_running_loop()

    def feed(item) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is shutting down
            loop.call_soon_threadsafe(queue.put_nowait, None if index is None else (index, item))

    return feed


async def _stream(server: Server, body, chat: bool, rid: str, job: Job, queue: asyncio.Queue, prompt_tokens: int, finish):
    created = int(time.time())
    done = False

    def chunk(index: int, text: str | None, delta: dict | None = None, reason: str | None = None) -> str:
        if chat:
            return p.sse(p.chat_chunk(rid, body.model, created, index, delta if delta is not None else {"content": text}, reason))
        return p.sse(p.completion_chunk(rid, body.model, created, index, text or "", reason))

    try:
        if chat:
            for i in range(len(job.rows)):
                yield chunk(i, None, {"role": "assistant", "content": ""})
        while (item := await queue.get()) is not None:
            yield chunk(item[0], item[1])
        try:
            results = job.future.result()
        except Exception as exc:  # noqa: BLE001  (the status line is gone already: report the failure in the stream)
            traceback.print_exception(exc, file=sys.stderr)
            finish(None, 500, {"message": f"generation failed: {type(exc).__name__}"})
            yield p.sse(p.error_body(f"Generation failed ({type(exc).__name__}); the server log has the details.", "server_error"))
            yield p.sse("[DONE]")
            done = True
            return
        for i, result in enumerate(results):
            yield chunk(i, "", {}, result.finish_reason)
        if body.stream_options is not None and body.stream_options.include_usage:
            yield p.sse({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                         "model": body.model, "choices": [], "usage": p.usage(prompt_tokens, sum(r.completion_tokens for r in results))})
        yield p.sse("[DONE]")
        done = True
        finish(results, 200)
    finally:
        if not done:  # the client went away: stop generating its rows, log what is known
            job.cancel()
            finish(None, 499, {"message": "client closed the connection"})


def _logged_request(body, chat: bool) -> dict:
    logged = {"messages": [{"role": m.role, "content": m.text()} for m in body.messages]} if chat else {"prompt": body.prompt}
    logged.update({k: getattr(body, k) for k in ("max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream")})
    return logged


# ----------------------------------------------------------------------------------------------------------------------
# Running it


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    """Serve until interrupted (uvicorn, one process: the model is in memory once)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False, timeout_graceful_shutdown=5)


class BackgroundServer:
    """uvicorn in a daemon thread on a free loopback port: `with BackgroundServer(app) as s: httpx.get(s.url + '/health')`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app, self.host, self.port = app, host, port
        self.server = None
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:  # noqa: PYI034
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", access_log=False, timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name="tunelab-serve", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
