"""An ordered map over worker processes, or in this process for one worker: what build and derive render with."""

from __future__ import annotations

import contextlib
import multiprocessing


@contextlib.contextmanager
def ordered_map(func, init, params: dict, workers: int):
    """Yields tasks -> iterator of func(task), in task order; `init(params)` prepares each worker (or this process)."""
    if workers <= 1:
        init(params)
        yield lambda tasks: map(func, tasks)
        return
    with multiprocessing.get_context("fork").Pool(workers, init, (params,)) as pool:
        # Chunks of up to 16 tasks: fewer round trips, while every worker still gets several chunks.
        yield lambda tasks: pool.imap(func, tasks, chunksize=min(16, max(1, len(tasks) // (workers * 8))))
