"""How much memory a training step needs, and the two choices made from it: micro-batch size and checkpointing.

The estimate is the activations autograd keeps per token for a decoder block (measured on Llama-style models under bf16
autocast with the shared input casts of `precision.share_input_casts`: about 20 x hidden + 8 x intermediate bytes per
layer and token, twice that in fp32), times a margin for the backward pass's transient buffers.
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch

# Per micro-batch, on a CPU. With one micro-batch at a time on 2 cores, 512-token micro-batches ran 210 tok/s, 256: 204,
# 1024: 191, unsplit: 143; with one per core (train/parallel.py), 512 ran 328 tok/s, 256: 300, 1024: 320, 2048: 272.
CPU_MICRO_BATCH_TOKENS = 512
BACKWARD_MARGIN = 2.0  # peak / saved activations, measured on SmolLM2-135M LoRA steps


def activation_bytes_per_token(config, dtype: torch.dtype | None) -> int:
    """Estimated bytes autograd keeps per token for the whole decoder stack."""
    hidden = getattr(config, "hidden_size", 1024)
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    layers = getattr(config, "num_hidden_layers", 12)
    per_layer = 20 * hidden + 8 * intermediate
    return int(layers * per_layer * (1 if dtype in (torch.bfloat16, torch.float16) else 2))


def available_memory(device: torch.device) -> int:
    """Bytes free for activations on `device` (GPU free memory; on a CPU, MemAvailable)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def plan_memory(setting_tokens, setting_checkpointing, config, dtype, device, longest: int, free: int | None = None,
                threads: int = 1) -> tuple[int | None, bool, str]:
    """(micro-batch token budget or None, gradient checkpointing on?, a one-line reason) for a run whose longest row
    has `longest` tokens and whose steps run `threads` micro-batches at once (the auto budget is per micro-batch, so
    they share the memory). Checkpointing under `auto` turns on only when even that one row would not fit."""
    free = available_memory(device) if free is None else free
    per_token = activation_bytes_per_token(config, dtype) * BACKWARD_MARGIN
    fits = int(0.6 * free / per_token)  # tokens whose activations fit in 60% of free memory
    share = max(1, fits // threads)  # each of the micro-batches in flight at once
    if setting_tokens == "auto":
        tokens = min(CPU_MICRO_BATCH_TOKENS, share) if device.type == "cpu" else share
    else:
        tokens = setting_tokens
    if setting_checkpointing == "auto":
        checkpointing = max(longest, 0 if setting_tokens == "auto" else (tokens or 0) * threads) > fits
    else:
        checkpointing = bool(setting_checkpointing)
    reason = (f"micro-batches of <= {tokens} tokens" if tokens else "no micro-batch split") + (
        f", {threads} at once" if threads > 1 else "") + (
        f", gradient checkpointing on ({free / 2**30:.1f} GiB free)" if checkpointing else "")
    return tokens, checkpointing, reason


def return_freed_memory() -> bool:
    """Make glibc give large freed blocks back to the OS at once (Linux only; True when set).

    glibc raises its mmap threshold each time a large block is freed, so after the first step most activations come from
    the heap, where freed memory stays resident: peak RSS of a SmolLM2-135M LoRA step grew by ~0.5 GB that way. A fixed
    1 MiB threshold keeps tensors in their own mappings, returned when freed; the cost is page faults on reuse, which
    measured within noise of the step time.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 20) and libc.mallopt(m_trim_threshold, 1 << 20))
    except (OSError, AttributeError):
        return False
