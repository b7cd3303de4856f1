"""Compiled CPU kernels, built from their C source (beside this file) by the system C compiler the first time they are
needed, cached as shared libraries under `$TUNELAB_CACHE/kernels` (~/.cache/tunelab/kernels) and called through ctypes,
which releases the GIL while they run.

Where a kernel cannot be had (no compiler, a CPU without the instructions it needs, another OS, a failed build) its
loader returns None once and the caller keeps its PyTorch path, so nothing ever depends on a compiler being present.
`TUNELAB_KERNELS=0` turns them all off.

    attention_bf16.c   causal attention forward in bf16 on AVX512-BF16 CPUs (evaluation; attention.py)
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from tunelab.train.precision import cpu_flags

HERE = Path(__file__).resolve().parent
FLAGS = ("-O3", "-std=c11", "-shared", "-fPIC", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16",
         "-fno-math-errno")


def enabled() -> bool:
    return os.environ.get("TUNELAB_KERNELS", "1") not in ("0", "false", "no", "off")


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def build(name: str, cache: Path | None = None) -> Path | None:
    """The shared library of `name`.c, compiled once per source and flags (an atomic rename, so processes building
    at the same time never load half a file); None when there is no compiler or the build fails."""
    from tunelab.models.loading import cache_dir

    compiler = _compiler()
    if compiler is None:
        return None
    source = (HERE / f"{name}.c").read_bytes()
    digest = hashlib.sha256(source + " ".join((compiler, *FLAGS)).encode()).hexdigest()[:16]
    target = (cache or cache_dir() / "kernels") / f"{name}-{digest}.so"
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
    except OSError:  # a read-only cache: no kernel, as without a compiler
        return None
    try:
        subprocess.run([compiler, *FLAGS, "-o", tmp, str(HERE / f"{name}.c"), "-lm"], check=True, capture_output=True,
                       timeout=120)
        os.replace(tmp, target)
    except (OSError, subprocess.SubprocessError):
        Path(tmp).unlink(missing_ok=True)
        return None
    return target


@functools.cache
def attention_bf16() -> ctypes.CDLL | None:
    """The bf16 attention kernel's library, or None where it cannot run here (see the module docstring)."""
    if not enabled() or os.name != "posix" or not {"avx512_bf16", "avx512bw", "avx512vl", "avx512dq"} <= cpu_flags():
        return None
    path = build("attention_bf16")
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        return None
    fn = lib.tunelab_attention_bf16
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5 + [ctypes.c_int, ctypes.c_float]
    return lib


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool) -> torch.Tensor | None:
    """softmax(q k^T * scale (+ causal mask)) v without gradients, for bf16 q [N, G, S, D] (the G query heads of each of
    N key/value heads) and k, v [N, P + S, D] (P keys of a cached prefix that every query sees): the output shaped as q,
    or None where the kernel does not apply (then the caller runs its own path). With several intra-op threads the N
    heads are split between them."""
    if k.dtype != q.dtype or v.dtype != q.dtype or q.device.type != "cpu" or v.shape[-1] != q.shape[-1] \
            or k.shape[1] < q.shape[2] or not attention_applies(q.dtype, q.shape[-1]):
        return None
    lib = attention_bf16()
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    n, group, length, dim = q.shape
    keys = k.shape[1]

    def run(a: int, b: int) -> int:
        return lib.tunelab_attention_bf16(q[a].data_ptr(), k[a].data_ptr(), v[a].data_ptr(), out[a].data_ptr(), b - a,
                                          group, length, keys, dim, int(causal), scale)

    threads = min(torch.get_num_threads(), n)
    if threads <= 1:
        codes = [run(0, n)]
    else:
        bounds = [n * i // threads for i in range(threads + 1)]
        codes = list(_pool(threads, os.getpid()).map(run, bounds[:-1], bounds[1:]))
    return out if not any(codes) else None


def attention_applies(dtype: torch.dtype, dim: int) -> bool:
    """Whether `attention` takes inputs of this dtype and head size on this machine."""
    return dtype == torch.bfloat16 and dim in (64, 128) and attention_bf16() is not None


@functools.cache
def _pool(threads: int, pid: int) -> ThreadPoolExecutor:
    """One pool per process: a forked child gets a pool of its own (the parent's threads do not survive the fork)."""
    return ThreadPoolExecutor(threads, thread_name_prefix="tunelab-kernel")
