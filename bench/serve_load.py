"""Load test of `tunelab serve` on loopback: N concurrent clients each send M chat requests; prints errors, latency
percentiles, requests/s and generated tokens/s.

    python bench/serve_load.py                                   # starts `tunelab serve default` itself, 50 x 20, max_tokens 8
    python bench/serve_load.py --clients 10 --requests 3 --max-tokens 16
    python bench/serve_load.py --url http://127.0.0.1:8000 --model demo --api-key sk-local   # a server already running

Without --url the server is started as a subprocess on a free loopback port (`python -m tunelab serve TARGET --no-log`)
and stopped at the end; its startup time is not counted. Every request is bounded by --timeout and the whole run by
the number of requests, so the script always ends. Exit code 1 if any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

PROMPTS = [
    "Say something about the fox.",
    "Write a haiku about autumn leaves.",
    "What is the capital of France?",
    "Extract the ticket as JSON: my blender broke, order #A12345.",
    "Hello! How can I help you today?",
]


@dataclass
class LoadResult:
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    seconds: float = 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]

    def summary(self) -> dict:
        return {"requests": self.requests, "errors": len(self.errors), "p50_s": round(self.percentile(50), 3),
                "p99_s": round(self.percentile(99), 3), "mean_s": round(statistics.fmean(self.latencies), 3) if self.latencies else None,
                "requests_per_s": round(self.requests / self.seconds, 2) if self.seconds else None,
                "completion_tokens": self.completion_tokens,
                "tokens_per_s": round(self.completion_tokens / self.seconds, 1) if self.seconds else None,
                "wall_s": round(self.seconds, 2)}


async def run_load(url: str, model: str, clients: int = 50, requests: int = 20, max_tokens: int = 8, api_key: str | None = None,
                   timeout: float = 120.0, stream_every: int = 0) -> LoadResult:
    """`clients` concurrent clients, each sending `requests` chat completions one after another (every
    `stream_every`-th one streamed, 0 = none); returns counts, latencies and errors (a bounded number of requests)."""
    import httpx

    result = LoadResult()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def one(client: httpx.AsyncClient, i: int, j: int) -> None:
        body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[(i + j) % len(PROMPTS)]}],
                "max_tokens": max_tokens, "temperature": 0}
        stream = stream_every > 0 and (i * requests + j) % stream_every == 0
        started = time.perf_counter()
        try:
            if stream:
                body["stream"], body["stream_options"] = True, {"include_usage": True}
                async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as response:
                    if response.status_code != 200:
                        result.errors.append(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
                        return
                    done = False
                    async for line in response.aiter_lines():
                        if line == "data: [DONE]":
                            done = True
                        elif line.startswith("data: ") and '"usage"' in line:
                            usage = json.loads(line[6:]).get("usage")
                            result.completion_tokens += usage["completion_tokens"] if usage else 0
                    if not done:
                        result.errors.append("stream ended without [DONE]")
                        return
            else:
                response = await client.post(f"{url}/v1/chat/completions", json=body, headers=headers)
                if response.status_code != 200:
                    result.errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
                    return
                result.completion_tokens += response.json()["usage"]["completion_tokens"]
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            result.errors.append(f"{type(exc).__name__}: {exc}")
            return
        finally:
            result.requests += 1
        result.latencies.append(time.perf_counter() - started)

    async def client_loop(client: httpx.AsyncClient, i: int) -> None:
        for j in range(requests):
            await one(client, i, j)

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        await asyncio.gather(*(client_loop(client, i) for i in range(clients)))
    result.seconds = time.perf_counter() - started
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(target: str, extra: list[str], log: bool = False, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "tunelab", "serve", target, "--host", "127.0.0.1", "--port", str(port), *extra]
    cmd += [] if log else ["--no-log"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.terminate()
    raise SystemExit("the server did not answer /health within 300 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="A running server (default: start `tunelab serve TARGET` on a free port).")
    parser.add_argument("--target", default="default", help="What to serve when the script starts the server.")
    parser.add_argument("--model", help="Model name to request (default: the server's first model).")
    parser.add_argument("--api-key", default=os.environ.get("TUNELAB_API_KEY"))
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=20, help="Requests per client.")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--stream-every", type=int, default=0, help="Stream every k-th request (0: none).")
    parser.add_argument("--timeout", type=float, default=300.0, help="Seconds one request may take.")
    parser.add_argument("--server-args", default="", help="Extra `tunelab serve` options, e.g. '--max-batch-size 32'.")
    args = parser.parse_args()

    import httpx

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # killed (e.g. by `timeout`): still stop the server below
    proc = None
    url = args.url
    if url is None:
        started = time.perf_counter()
        proc, url = _start_server(args.target, args.server_args.split())
        print(f"server up in {time.perf_counter() - started:.1f} s at {url}", file=sys.stderr)
    try:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        model = args.model or httpx.get(f"{url}/v1/models", headers=headers, timeout=10).json()["data"][0]["id"]
        result = asyncio.run(run_load(url, model, args.clients, args.requests, args.max_tokens, args.api_key, args.timeout,
                                      args.stream_every))
        health = httpx.get(f"{url}/health", timeout=10).json()
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
    summary = result.summary()
    summary.update({"clients": args.clients, "requests_per_client": args.requests, "max_tokens": args.max_tokens, "model": model,
                    "batches": health.get("batches")})
    print(json.dumps(summary, indent=2))
    for error in result.errors[:5]:
        print(f"error: {error}", file=sys.stderr)
    print(f"{result.requests} requests, {len(result.errors)} errors; p50 {summary['p50_s']} s, p99 {summary['p99_s']} s, "
          f"{summary['tokens_per_s']} generated tokens/s, {summary['requests_per_s']} requests/s")
    sys.exit(1 if result.errors else 0)


if __name__ == "__main__":
    main()
