"""The OpenAI wire format: request bodies as pydantic models (they make the OpenAPI schema), responses, chunks, errors.

Fields the server does not act on (user, logit_bias, presence_penalty, ...) are accepted and ignored, as other
OpenAI-compatible servers do; fields that would change the answer and are not supported (tools, logprobs, echo, ...)
are refused with a 400 naming the field, rather than silently ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 16
MAX_STOP = 4
UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "logprobs", "top_logprobs", "echo", "best_of", "suffix",
               "response_format", "audio", "prediction")
_DEFAULTS = {"tool_choice": ("none", "auto"), "best_of": (1,), "response_format": ({"type": "text"},)}


def _is_default(key: str, value: Any) -> bool:
    return value is None or value is False or value in ([], {}, "") or value in _DEFAULTS.get(key, ())


class ApiError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """What chat and text completions share."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(description="A name from /v1/models.")
    max_tokens: Annotated[int, Field(ge=1)] | None = Field(None, description="Most tokens to generate (default: the server limit).")
    temperature: Annotated[float, Field(ge=0, le=2)] | None = Field(None, description="0 = greedy; default 1.")
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    def unsupported_field(self) -> str | None:
        """The first field that would change the answer and is not implemented, when it is set to a non-default."""
        extra = self.model_extra or {}
        return next((key for key in UNSUPPORTED if not _is_default(key, extra.get(key))), None)

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stops if s)


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_N)]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, model: str, results: list, prompt_tokens: int) -> dict:
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model, "system_fingerprint": None,
        "choices": [{"index": i, "message": {"role": "assistant", "content": r.text}, "finish_reason": r.finish_reason,
                     "logprobs": None} for i, r in enumerate(results)],
        "usage": usage(prompt_tokens, sum(r.completion_tokens for r in results)),
    }


def completion_response(rid: str, model: str, results: list, prompt_tokens: int) -> dict:
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model, "system_fingerprint": None,
        "choices": [{"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None} for i, r in enumerate(results)],
        "usage": usage(prompt_tokens, sum(r.completion_tokens for r in results)),
    }


def chat_chunk(rid: str, model: str, created: int, index: int, delta: dict, finish_reason: str | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "system_fingerprint": None,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}


def completion_chunk(rid: str, model: str, created: int, index: int, text: str, finish_reason: str | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "system_fingerprint": None,
            "choices": [{"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}]}


def sse(data: dict | str) -> str:
    """One server-sent event: `data: {...}` and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """A one-line message and the offending parameter (`messages[0].role`) from FastAPI's validation errors."""
    if not errors:
        return "invalid request body", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return (f"We could not parse the JSON body of your request ({detail}). The API expects a JSON object with "
                "Content-Type: application/json."), None
    param = _param(first.get("loc", ()))
    if not param:
        return "The request body must be a JSON object (Content-Type: application/json).", None
    if first.get("type") == "missing":
        return f"'{param}' is a required property", param
    # A union field (stop: str | list[str]) reports one error per alternative: show them together.
    messages = list(dict.fromkeys(str(e.get("msg", "invalid value")) for e in errors if _param(e.get("loc", ())) == param))
    return f"{param}: {' | '.join(messages)}", param


def _param(loc) -> str:
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif any(ch in str(part) for ch in "[](),") or part in ("str", "int", "float", "bool", "list", "TextPart"):
            break  # the name of a union alternative, not a field
        else:
            out += f".{part}" if out else str(part)
    return out
