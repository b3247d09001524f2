"""Requests from many threads (the page's queue workers, the API's event loop) gathered into batches for one
worker thread, which runs the student once per batch.

    batcher = Batcher(model.sample_batch, max_batch=4, wait=0.05)
    future = batcher.submit((request, notices))        # concurrent.futures.Future, from any thread
    sampled = future.result()                          # or `await asyncio.wrap_future(future)`

The worker takes the first waiting item, then waits at most `wait` seconds for more, up to `max_batch` items,
and calls `run(items) -> list` once: each entry is that item's result, or the exception it failed with
(raised from its own future alone; the other items of the batch are not affected). While the worker runs a
batch, new items queue up for the next one, so a busy server batches without waiting at all.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

log = logging.getLogger(__name__)


class Batcher:
    """One daemon worker thread running `run(items)` over batches of at most `max_batch` submitted items,
    gathered for at most `wait` seconds after the first."""

    def __init__(self, run: Callable[[list], list], max_batch: int = 4, wait: float = 0.05) -> None:
        if max_batch < 1 or wait < 0:
            raise ValueError(f"max_batch must be >= 1 and wait >= 0, got {max_batch}, {wait}")
        self.run, self.max_batch, self.wait = run, int(max_batch), float(wait)
        self._items: queue.SimpleQueue[tuple[object, Future]] = queue.SimpleQueue()
        self._start_lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self.batch_sizes: list[int] = []  # one entry per call of `run`, for logs and tests

    def submit(self, item) -> Future:
        """Queue `item` for the next batch; its future gets `run`'s entry for it."""
        future: Future = Future()
        self._items.put((item, future))
        with self._start_lock:
            if self._worker is None:
                self._worker = threading.Thread(target=self._loop, name="prd-serve-batcher", daemon=True)
                self._worker.start()
        return future

    def _gather(self) -> list[tuple[object, Future]]:
        batch = [self._items.get()]  # blocks until there is work
        deadline = time.monotonic() + self.wait
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                batch.append(self._items.get(timeout=left) if left > 0 else self._items.get_nowait())
            except queue.Empty:
                break
        return batch

    def _loop(self) -> None:
        while True:
            batch = [(item, future) for item, future in self._gather() if future.set_running_or_notify_cancel()]
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            try:
                results = self.run([item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"the batch function returned {len(results)} results for {len(batch)} items")
            except BaseException as err:  # a bug in `run` itself: every item of this batch gets it
                log.exception("batch of %d failed", len(batch))
                results = [err] * len(batch)
            for (_, future), result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
