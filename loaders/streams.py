"""Each survey's shuffled sample stream: passes over its shards, shuffle windows, and clean pass boundaries.

A pass shuffles the survey's shard order, cuts it into windows of shuffle_window_shards shards and shuffles the
samples within each window; later passes (on_exhausted="repeat") are fresh permutations, seeded by (seed, epoch,
survey name, pass, window). Where a pass starts inside a global batch, its first samples avoid the previous
pass's last ones, so no batch holds a galaxy twice.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

MAX_BOUNDARY_SEARCH = 1 << 22


class Streams(NamedTuple):
    """Everything a survey's shuffled stream depends on (never the rank, the world size or the worker)."""
    names: tuple[str, ...]
    shard_counts: list[np.ndarray]
    seed: int
    epoch: int
    window: int
    allocation: Callable[[int], np.ndarray]
    """Counts (n, num_surveys) of the epoch's first n global batches, to find the batch where a pass starts."""


def stream_rows(streams: Streams, s: int, start: int, stop: int, cache: dict) -> np.ndarray:
    available = int(streams.shard_counts[s].sum())
    pieces = []
    position = start
    while position < stop:
        pass_index, offset = divmod(position, available)
        shard_order, window_starts = _cached(cache, (s, pass_index), lambda: _pass_plan(streams, s, pass_index))
        window = int(np.searchsorted(window_starts, offset, side="right")) - 1
        rows = _cached(cache, (s, pass_index, window),
                       lambda: _window_rows(streams, s, pass_index, window, shard_order, window_starts))
        begin = offset - int(window_starts[window])
        take = min(stop - position, len(rows) - begin)
        pieces.append(rows[begin:begin + take])
        position += take
    return np.concatenate(pieces) if pieces else np.empty((0, 2), dtype=np.int64)


def _pass_plan(streams: Streams, s: int, pass_index: int) -> tuple[np.ndarray, np.ndarray]:
    counts = streams.shard_counts[s]
    shard_order = _rng(streams, s, pass_index, 0, 0).permutation(len(counts))
    window_sizes = np.add.reduceat(counts[shard_order], np.arange(0, len(counts), streams.window))
    return shard_order, np.concatenate([[0], np.cumsum(window_sizes)])


def _window_rows(streams: Streams, s: int, pass_index: int, window: int, shard_order: np.ndarray,
                 window_starts: np.ndarray) -> np.ndarray:
    rows = _shuffled_window(streams, s, pass_index, window, shard_order)
    tail, head = _boundary_split(streams, s, pass_index)
    if not (tail and head):
        return rows
    # The first windows that hold tail + head samples settle the pass boundary together.
    num = int(np.searchsorted(window_starts, tail + head, side="left"))
    if window >= num:
        return rows
    block = np.concatenate([_shuffled_window(streams, s, pass_index, w, shard_order) for w in range(num)])
    block = _apart_from_previous_pass(streams, s, pass_index, block, tail, head)
    return block[window_starts[window]:window_starts[window + 1]]


def _shuffled_window(streams: Streams, s: int, pass_index: int, window: int, shard_order: np.ndarray) -> np.ndarray:
    shards = shard_order[window * streams.window:(window + 1) * streams.window]
    sizes = streams.shard_counts[s][shards]
    rows = np.empty((int(sizes.sum()), 2), dtype=np.int64)
    rows[:, 0] = np.repeat(shards, sizes)
    rows[:, 1] = np.arange(len(rows)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    return rows[_rng(streams, s, pass_index, 1, window).permutation(len(rows))]


def _boundary_split(streams: Streams, s: int, pass_index: int) -> tuple[int, int]:
    """(samples of the previous pass, samples of this one) in the global batch where this pass starts."""
    if pass_index == 0:
        return 0, 0
    boundary = pass_index * int(streams.shard_counts[s].sum())
    num_batches = 64
    while True:  # enough batches that survey s's running total passes the boundary
        counts = streams.allocation(num_batches)[:, s]
        ends = np.cumsum(counts)
        if ends[-1] > boundary:
            break
        if num_batches >= MAX_BOUNDARY_SEARCH:
            return 0, 0  # a schedule that stops drawing the survey: no batch ever holds this pass's start
        num_batches *= 2
    b = int(np.searchsorted(ends, boundary, side="right"))
    return boundary - int(ends[b] - counts[b]), int(ends[b]) - boundary


def _apart_from_previous_pass(streams: Streams, s: int, pass_index: int, rows: np.ndarray, tail: int,
                              head: int) -> np.ndarray:
    """Swap the previous pass's last `tail` samples out of this pass's first `head` (deterministically), so the
    global batch that holds the end of one pass and the start of the next never holds a galaxy twice."""
    available = int(streams.shard_counts[s].sum())
    recent = {tuple(r) for r in stream_rows(streams, s, pass_index * available - tail, pass_index * available,
                                             {}).tolist()}
    clash = [i for i in range(head) if tuple(rows[i].tolist()) in recent]
    spare = [i for i in range(head, len(rows)) if tuple(rows[i].tolist()) not in recent][:len(clash)]
    assert len(spare) == len(clash), "a pass holds tail + head distinct samples"
    rows = rows.copy()
    rows[clash + spare] = rows[spare + clash]
    return rows


def _rng(streams: Streams, s: int, pass_index: int, purpose: int, window: int) -> np.random.Generator:
    # Keyed by the survey's name, not its index, so its stream does not change with the rest of the mix.
    key = [streams.seed, streams.epoch, zlib.crc32(streams.names[s].encode()), pass_index, purpose, window]
    return np.random.default_rng(key)


def _cached(cache: dict, key: tuple, make: Callable[[], Any], max_entries: int = 64) -> Any:
    if key in cache:
        cache[key] = cache.pop(key)  # most recently used last
    else:
        cache[key] = make()
        if len(cache) > max_entries:
            del cache[next(iter(cache))]
    return cache[key]
