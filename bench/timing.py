"""Timing shared by the micro-benchmarks (attention.py, lora_layer.py)."""

from __future__ import annotations

import time
from collections.abc import Callable


def ms_per_call(fn: Callable[[], object], repeat: int, warmup: int = 1) -> float:
    """Mean milliseconds of `fn()` over `repeat` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1e3
