"""Several micro-batches at once on a CPU: one Python thread per core, each on one intra-op thread.

A small model's step on a CPU is mostly ops too small to split well across cores (norms, rotary embeddings, casts, rank-16
adapter matmuls, attention of short rows), so two micro-batches side by side, one core each, beat one micro-batch on two
cores: SmolLM2-135M LoRA steps ran 1.29x faster that way (286 vs 223 tokens/s on 2 cores, bench/train_throughput.py).
torch releases the GIL inside its kernels, and autograd runs a backward pass on the thread that started it.

The split is fixed by the batch (a step's rows dealt to the threads by estimated cost, largest first, each thread's
rows then cut into micro-batches: `split_step`), and gradients are summed in a fixed order: thread 0 accumulates into
`.grad` as the plain loop does; every other thread sums its own gradients with `torch.autograd.grad` and they are
added after the join, in thread order. A run is therefore reproducible, and its
gradients differ from the one-thread loop's only by the order of a floating-point sum.

Only where nothing in a step depends on which thread runs first: no dropout (its masks come from one shared generator),
no fp16 loss scaling, one process, and an objective that keeps no state between its calls (`Objective.thread_safe`;
DPO's reference pass switches the adapter off for the whole model, so it is not).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Self, TypeVar

import torch

from tunelab.data.dataset import micro_batches

T = TypeVar("T")
R = TypeVar("R")


def step_threads(setting: int | str, device: torch.device, model: torch.nn.Module, thread_safe: bool,
                 processes: int = 1) -> int:
    """How many micro-batches run at once for `training.micro_batch_threads` (`auto` or a count): 1 off a CPU, with
    several processes, dropout or an objective that is not thread-safe."""
    wanted = torch.get_num_threads() if setting == "auto" else int(setting)
    if device.type != "cpu" or wanted <= 1 or processes > 1 or not thread_safe:
        return 1
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()) or _config_dropout(model):
        return 1
    return wanted


def _config_dropout(model: torch.nn.Module) -> bool:
    """Attention dropout is a functional call inside the attention, not an nn.Dropout module."""
    config = getattr(model, "config", None)
    return any(float(getattr(config, key, 0.0) or 0.0) > 0 for key in ("attention_dropout", "attention_probs_dropout_prob"))


ATTENTION_LENGTH = 2048  # a row of this many tokens spends about as long in attention as in the rest of its layers


def row_cost(length: int) -> float:
    """A row's estimated forward + backward time, in tokens: the linear layers grow with its length, attention with its
    square."""
    return length * (1 + length / ATTENTION_LENGTH)


def split_step(rows: Sequence[int], lengths: Sequence[int], threads: int, budget: int | None) -> list[list[list[int]]]:
    """A step's rows (indices into `lengths`) dealt to `threads` by estimated cost, then each thread's rows cut into as
    few micro-batches as `budget` padded tokens allow (rows of similar length together): per thread, its micro-batches.

    Rows, not micro-batches, are dealt, so that the threads end together, and each thread runs few, large
    micro-batches: on two cores 8 rows of ~240 tokens ran 297 tokens/s as 8 one-row micro-batches, 361 as 2-row and
    376 as 4-row ones (one per thread); of ~120 tokens 285, 379 and 414. Deterministic, so a run repeats exactly."""
    groups = deal([row_cost(lengths[i]) for i in rows], threads)
    return [micro_batches([rows[k] for k in g], lengths, budget) for g in groups]


def deal(sizes: Sequence[float], threads: int) -> list[list[int]]:
    """Indices of `sizes` dealt to `threads` groups, largest first to the least-loaded group (ties: lowest group), each
    group in its original order. Deterministic, so a run repeats exactly."""
    groups: list[list[int]] = [[] for _ in range(threads)]
    load = [0] * threads
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        g = min(range(threads), key=lambda g: (load[g], g))
        groups[g].append(i)
        load[g] += sizes[i]
    return [sorted(g) for g in groups if g]


@contextlib.contextmanager
def _intra_op_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Workers:
    """`threads - 1` pool threads beside the calling thread, kept for a whole run; `run` maps work over groups."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._pool = ThreadPoolExecutor(max_workers=threads - 1, thread_name_prefix="tunelab-step") if threads > 1 else None

    def run(self, work: Callable[[int, list[T]], R], groups: list[list[T]]) -> list[R]:
        """`work(thread_index, group)` for every group at once, group 0 on the calling thread, each thread on one
        intra-op thread and in the caller's grad mode (autocast is per thread too: `work` enters it itself); results in
        group order. An exception in any thread is raised here after all have finished."""
        if len(groups) <= 1 or self._pool is None:
            return [work(0, group) for group in groups]
        if len(groups) > self.threads:
            raise ValueError(f"{len(groups)} groups for {self.threads} threads")
        grad_enabled = torch.is_grad_enabled()  # grad mode is per thread: a pool thread would start with grads on

        def target(g: int) -> R:
            torch.set_num_threads(1)
            with torch.set_grad_enabled(grad_enabled):
                return work(g, groups[g])

        with _intra_op_threads(1):
            futures = [self._pool.submit(target, g) for g in range(1, len(groups))]
            first, error = None, None
            try:
                first = target(0)
            except BaseException as exc:  # noqa: BLE001 - raised after the other threads finish
                error = exc
            rest = []
            for f in futures:
                try:
                    rest.append(f.result())
                except BaseException as exc:  # noqa: BLE001
                    error = error or exc
        if error is not None:
            raise error
        return [first, *rest]

    def share(self, work: Callable[[int, Iterator[T]], R], items: Sequence[T], threads: int | None = None) -> list[R]:
        """`work(thread_index, queue)` on `threads` threads (default: all) at once, every thread drawing items from one
        shared queue as it finishes the last, so that they end together whatever each item costs (give the items
        longest first); results in thread order. Which thread gets which item varies run to run, so `work` must not
        depend on it (each item's result its own)."""
        threads = min(threads or self.threads, self.threads, len(items))
        queue = _Queue(items)
        return self.run(lambda g, _: work(g, queue), [[]] * threads) if threads > 1 else [work(0, queue)]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Queue:
    """An iterator over `items` that several threads can draw from."""

    def __init__(self, items: Sequence[T]) -> None:
        self._items = iter(items)
        self._lock = threading.Lock()

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> T:
        with self._lock:
            return next(self._items)


def backward_in_threads(loss_of: Callable[[dict], tuple[torch.Tensor, float]], batches: list[dict],
                        params: list[torch.Tensor], workers: Workers, groups: list[list[int]] | None = None) -> list[float]:
    """Forward and backward of every micro-batch, each thread running its group of them (`groups`: batch indices per
    thread; default: dealt by padded size); gradients end up summed in the params' `.grad`.

    `loss_of(batch) -> (loss to differentiate, value to report)`. Returns the reported values in batch order.
    """
    if groups is None:
        groups = deal([int(b["input_ids"].numel()) for b in batches], workers.threads)

    def work(g: int, indices: list[int]):
        values, own = {}, None
        for i in indices:
            loss, value = loss_of(batches[i])
            values[i] = value
            if g == 0:
                loss.backward()
            else:
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                own = list(grads) if own is None else [
                    a if b is None else b if a is None else a.add_(b) for a, b in zip(own, grads)]
        return values, own

    done = workers.run(work, groups)
    for _, own in done[1:]:
        for p, grad in zip(params, own or ()):
            if grad is None:
                continue
            if p.grad is None:
                p.grad = grad
            else:
                p.grad.add_(grad)
    values: dict[int, float] = {}
    for v, _ in done:
        values.update(v)
    return [values[i] for i in range(len(batches))]
