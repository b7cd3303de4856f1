"""Serve a model over an OpenAI-compatible HTTP API, watch what it is asked, and run it over whole datasets.

    tunelab serve runs/demo --adapters support=runs/support --api-key sk-local   # http://127.0.0.1:8000/v1
    tunelab monitor serve_logs --reference data/train.jsonl --emit review.jsonl
    tunelab predict runs/demo --input data/test.jsonl --output predictions.jsonl

One module per concern, read in this order:
    models.py      load the base model once, attach LoRA adapters by name, check they share the base
    generation.py  one left-padded batch through `model.generate`: per-row stop strings, token limits, streamed text
    batching.py    the background worker that groups concurrent requests into batches
    protocol.py    OpenAI request bodies (pydantic) and response/chunk/error shapes
    guards.py      API keys, per-key rate limits, request-size limit (ASGI middleware)
    telemetry.py   Prometheus metrics and the JSONL request log (PII scrubbed on request)
    app.py         the FastAPI app that joins them, and `run_server` for the CLI
    monitor.py     input drift of logged requests against the training data; logs -> dataset
    predict.py     batch inference over a data file with resumable output

The web dependencies (fastapi, uvicorn, prometheus_client) are optional: `pip install 'tunelab[serve]'`.
"""

from __future__ import annotations

import importlib.util

from tunelab.errors import TunelabError

SERVE_PACKAGES = {"fastapi": "fastapi", "uvicorn": "uvicorn", "prometheus_client": "prometheus_client"}


def require_serve_dependencies() -> None:
    """Raises TunelabError naming the pip command when a web dependency of `tunelab serve` is missing."""
    missing = [pip for module, pip in SERVE_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise TunelabError(f"tunelab serve needs {', '.join(missing)}; run `pip install 'tunelab[serve]'` "
                           f"(or `pip install {' '.join(missing)}`)")
