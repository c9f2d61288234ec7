"""Micro-batching: requests queued by the web threads are gathered into one model forward by a worker thread.

The worker takes the first waiting job, then keeps taking jobs until the batch holds `max_batch` galaxies or
`max_wait_s` has passed since that first job arrived, and hands the whole list to `run` once; `run` resolves each
job's future (the batcher fails them if it raises). A job larger than `max_batch` goes alone (`run` chunks it).
With `expecting` (how many requests are being decoded and will be queued soon), the wait ends early when the
queue is empty and none is on its way: a lone request does not wait for company that is not coming.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Job:
    """One request's galaxies: what the model needs and where its answer goes."""
    images: torch.Tensor  # (n, 3, S, S) normalised
    survey: str
    mc_samples: int
    model: Any = None  # the model version the images were decoded for, which runs them
    seeds: list[int] = field(default_factory=list)  # each image's MC-dropout seed (from its bytes)
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.perf_counter)

    @property
    def size(self) -> int:
        return int(self.images.shape[0])


class MicroBatcher:
    """A queue and one worker thread calling `run(jobs)` on batches of up to max_batch galaxies."""

    def __init__(self, run: Callable[[list[Job]], None], max_batch: int, max_wait_s: float,
                 expecting: Callable[[], int] = lambda: 1, name: str = "micro-batcher") -> None:
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError(f"--max-batch must be >= 1 and --max-wait-ms >= 0, got {max_batch} and "
                             f"{max_wait_s * 1000:g}")
        self.run, self.max_batch, self.max_wait_s, self.expecting = run, max_batch, max_wait_s, expecting
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._carry: Job | None = None  # a job that did not fit the last batch starts the next one
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Future:
        if self._closed:
            raise RuntimeError("the micro-batcher is closed")
        self._queue.put(job)
        return job.future

    def close(self, timeout: float = 10.0) -> None:
        """Finish what is queued, then stop the worker."""
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)

    def _next_batch(self) -> list[Job] | None:
        first = self._carry or self._queue.get()
        self._carry = None
        if first is None:
            return None
        batch, total = [first], first.size
        deadline = first.queued_at + self.max_wait_s
        while total < self.max_batch:
            if self._queue.empty() and not self.expecting():
                break
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)  # stop after this batch
                break
            if total + job.size > self.max_batch:
                self._carry = job
                break
            batch.append(job)
            total += job.size
        return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                self.run(batch)
            except BaseException as err:  # noqa: BLE001 - every waiting request must hear about it
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(err)
        while self._carry is not None or not self._queue.empty():  # closed: nothing queued may hang
            job = self._carry or self._queue.get_nowait()
            self._carry = None
            if job is not None and not job.future.done():
                job.future.set_exception(RuntimeError("the service is shutting down"))
