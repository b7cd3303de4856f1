"""Group concurrent requests into batches: one background thread owns the model and generates batch after batch.

    worker = BatchWorker(models.generate, max_batch_rows=16, wait_ms=5)
    job = worker.submit(Job("base", rows, temperature=0.0, top_p=1.0))   # from any thread
    results = job.future.result()                                          # or asyncio.wrap_future(job.future)

When a job arrives at an idle worker, the worker waits up to `wait_ms` for more, then runs the oldest job together
with every queued job for the same model and the same temperature/top_p (token limits and stop strings are per row),
up to `max_batch_rows` rows. Jobs that arrive while a batch runs are batched when it ends. A job with a seed runs alone,
so the same seed gives the same text whatever else is queued.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from tunelab.serve.generation import RowResult, RowSpec

GenerateFn = Callable[[str, list[RowSpec], float, float, "int | None"], list[RowResult]]


class QueueFull(Exception):
    """More jobs are waiting than the worker accepts; the caller answers 503."""


@dataclass(eq=False)
class Job:
    model: str
    rows: list[RowSpec]
    temperature: float
    top_p: float
    seed: int | None = None
    future: Future = field(default_factory=Future)

    def batch_key(self) -> tuple:
        return (self.model, self.temperature, self.top_p)

    def cancel(self) -> None:
        """Stop generating this job's rows (the client went away)."""
        for row in self.rows:
            row.cancelled.set()


@dataclass
class BatchStats:
    batches: int = 0
    rows: int = 0
    largest: int = 0


class BatchWorker:
    def __init__(self, generate: GenerateFn, max_batch_rows: int = 16, wait_ms: float = 5.0, max_queue: int = 1024,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.generate = generate
        self.max_batch_rows = max_batch_rows
        self.wait_s = wait_ms / 1000
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.stats = BatchStats()
        self._queue: queue.Queue[Job] = queue.Queue()
        self._pending: list[Job] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def depth(self) -> int:
        """Jobs waiting for a batch."""
        return self._queue.qsize() + len(self._pending)

    def submit(self, job: Job) -> Job:
        """Queue a job; starts the worker thread on first use.

        Raises:
            QueueFull: `max_queue` jobs are already waiting.
        """
        if self.depth() >= self.max_queue:
            raise QueueFull(f"{self.depth()} requests are already waiting")
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="tunelab-batch-worker", daemon=True)
                self._thread.start()
        self._queue.put(job)
        return job

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._pending:
                try:
                    self._pending.append(self._queue.get(timeout=0.1))
                except queue.Empty:
                    continue
                deadline = time.monotonic() + self.wait_s
                while self._rows(self._matching()) < self.max_batch_rows and (left := deadline - time.monotonic()) > 0:
                    try:
                        self._pending.append(self._queue.get(timeout=left))
                    except queue.Empty:
                        break
            self._drain()
            batch = self._matching()
            taken = {id(job) for job in batch}
            self._pending = [job for job in self._pending if id(job) not in taken]
            self._run_batch(batch)

    def _drain(self) -> None:
        while True:
            try:
                self._pending.append(self._queue.get_nowait())
            except queue.Empty:
                return

    def _matching(self) -> list[Job]:
        """The oldest job and the queued jobs that can share its batch, up to max_batch_rows rows."""
        first = self._pending[0]
        if first.seed is not None:
            return [first]
        batch, rows = [first], len(first.rows)
        for job in self._pending[1:]:
            if job.seed is None and job.batch_key() == first.batch_key() and rows + len(job.rows) <= self.max_batch_rows:
                batch.append(job)
                rows += len(job.rows)
        return batch

    @staticmethod
    def _rows(jobs: list[Job]) -> int:
        return sum(len(job.rows) for job in jobs)

    def _run_batch(self, batch: list[Job]) -> None:
        live = [job for job in batch if job.future.set_running_or_notify_cancel() and not job.rows[0].cancelled.is_set()]
        for job in batch:
            if job not in live and not job.future.done():
                job.future.set_result([RowResult("", "cancelled", 0) for _ in job.rows])
        if not live:
            return
        first = live[0]
        rows = [row for job in live for row in job.rows]
        try:
            results = self.generate(first.model, rows, first.temperature, first.top_p, first.seed)
        except Exception as exc:  # noqa: BLE001  (handed to every waiting request, which answers 500)
            for job in live:
                job.future.set_exception(exc)
            return
        self.stats.batches += 1
        self.stats.rows += len(rows)
        self.stats.largest = max(self.stats.largest, len(rows))
        if self.on_batch is not None:
            self.on_batch(len(rows))
        start = 0
        for job in live:
            job.future.set_result(results[start : start + len(job.rows)])
            start += len(job.rows)
