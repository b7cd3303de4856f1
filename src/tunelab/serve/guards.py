"""What stands in front of the model: API keys (401), per-key rate limits (429) and the request-size limit (413).

All three run as one ASGI middleware on /v1/ paths, before the body is parsed, so an unauthenticated or oversized
request costs no JSON parsing and no tokenizing. /health, /metrics and the OpenAPI schema stay open.

    keys = load_api_keys(["sk-one"], Path("keys.txt"))         # plus $TUNELAB_API_KEY, read by the CLI
    limit = parse_rate_limit("60/min")                         # (60, 60.0)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.serve.protocol import ApiError

_RATE = re.compile(r"^\s*(\d+)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$", re.IGNORECASE)
_PERIODS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0, "h": 3600.0, "hour": 3600.0}


def load_api_keys(keys: list[str] | None = None, keys_file: Path | str | None = None) -> set[str]:
    """The accepted keys: those given plus one per line of `keys_file` (blank lines and `#` comments skipped).

    Raises:
        TunelabError: the file is missing or holds no key; a key is blank or contains whitespace.
    """
    found = {k.strip() for k in keys or [] if k is not None}
    if keys_file is not None:
        path = Path(keys_file)
        if not path.is_file():
            raise TunelabError(f"--api-keys-file: {path} does not exist; give a file with one API key per line")
        from_file = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        from_file = [k for k in from_file if k and not k.startswith("#")]
        if not from_file:
            raise TunelabError(f"--api-keys-file: {path} holds no key; write one API key per line")
        found.update(from_file)
    for key in found:
        if not key or any(ch.isspace() for ch in key):
            raise TunelabError("--api-key: an API key may not be empty or contain spaces")
    return found


def key_id(key: str) -> str:
    """A short, stable, non-reversible name for a key (logs and rate-limit buckets never hold the key itself)."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:10]


def parse_rate_limit(spec: str | None) -> tuple[int, float] | None:
    """'60/min' -> (60, 60.0); also N/s and N/hour. None or '' -> no limit.

    Raises:
        TunelabError: not N/min, N/s or N/hour, or N < 1.
    """
    if not spec:
        return None
    match = _RATE.match(spec)
    if not match or int(match.group(1)) < 1:
        raise TunelabError(f"--rate-limit: '{spec}' is not a rate; write requests per period, e.g. 60/min, 5/s or 1000/hour")
    return int(match.group(1)), _PERIODS[match.group(2).lower()]


class RateLimiter:
    """At most `limit` requests per `period` seconds per identity, over a sliding window."""

    def __init__(self, limit: int, period: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.period, self.clock = limit, period, clock
        self._hits: dict[str, deque[float]] = {}

    def hit(self, identity: str) -> float | None:
        """Count a request; None when allowed, else the seconds until the next request would be allowed."""
        now = self.clock()
        hits = self._hits.setdefault(identity, deque())
        while hits and hits[0] <= now - self.period:
            hits.popleft()
        if len(hits) >= self.limit:
            return max(hits[0] + self.period - now, 0.001)
        hits.append(now)
        if len(self._hits) > 10_000:  # forget idle identities so the table cannot grow without bound
            self._hits = {k: v for k, v in self._hits.items() if v and v[-1] > now - self.period}
        return None


class GuardMiddleware:
    """ASGI middleware for /v1/ paths: API key, then rate limit, then body size; records the caller in scope state."""

    def __init__(self, app, keys: set[str], limiter: RateLimiter | None, max_body_bytes: int) -> None:
        self.app, self.keys, self.limiter, self.max_body_bytes = app, keys, limiter, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            identity = self._authenticate(headers, scope)
            scope.setdefault("state", {})["client"] = identity
            retry = self.limiter.hit(identity) if self.limiter else None
            if retry is not None:
                raise ApiError(429, f"Rate limit reached: {self.limiter.limit} requests per {self.limiter.period:g} s for this key; "
                               f"try again in {retry:.1f} s.", "requests", code="rate_limit_exceeded",
                               headers={"retry-after": str(max(1, round(retry)))})
            body = await self._read_body(headers, receive)
        except ApiError as exc:
            await send_error(send, exc)
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: disconnect notices
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _authenticate(self, headers: dict[str, str], scope) -> str:
        if not self.keys:
            client = scope.get("client")
            return f"ip-{client[0]}" if client else "anonymous"
        auth = headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if not auth:
            raise ApiError(401, "You didn't provide an API key. You need to provide your API key in an Authorization header "
                           "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).", code="missing_api_key")
        token = token.strip()
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(token.encode(), k.encode()) for k in self.keys):
            shown = f"{token[:3]}***{token[-2:]}" if len(token) > 8 else "***"
            raise ApiError(401, f"Incorrect API key provided: {shown}. Ask the server's operator for a valid key.",
                           code="invalid_api_key")
        return key_id(token)

    async def _read_body(self, headers: dict[str, str], receive) -> bytes:
        too_big = ApiError(413, f"Request body too large: the limit is {self.max_body_bytes} bytes.", code="request_too_large")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise too_big
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise too_big
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


async def send_error(send, exc: ApiError) -> None:
    body = json.dumps(exc.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (exc.headers or {}).items()]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
