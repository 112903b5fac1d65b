"""Batched execution with an automatic batch size.

With ``batch_size=0`` the batch size is tuned on the real work: batches of
1, 2, 4, ... items are run and timed, doubling while throughput improves and
memory lasts (up to ``cap``); the rest runs at the best size found. No item is
processed twice, so tuning costs nothing beyond the slower first batches.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Generic, NamedTuple, Sequence, TypeVar

import torch

from abliterate.errors import InvalidArgument, ResourceExhausted

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

DEFAULT_BATCH_CAP = 64
_MIN_GAIN = 1.05  # keep doubling only while throughput improves by at least 5 %


class BatchedRun(NamedTuple, Generic[R]):
    results: list[R]  # in the order of the items
    batch_size: int  # the size given, or the automatic size found
    #: False when automatic tuning ran out of items before it settled (every doubling still paid):
    #: the size is right for inputs this small only, and a larger input should tune again.
    settled: bool


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_batched(
    items: Sequence[T],
    fn: Callable[[Sequence[T]], list[R]],
    batch_size: int = 0,
    cap: int = DEFAULT_BATCH_CAP,
    progress: Callable[[int, int], None] | None = None,
    until_tuned: bool = False,
) -> BatchedRun[R]:
    """Run ``fn`` over ``items`` in batches; return the results and the batch size used.

    ``until_tuned`` stops as soon as the automatic batch size is known (the
    results then cover only the items run so far): for work that must be
    redone at the tuned size because results depend slightly on batch shapes.
    """
    if batch_size < 0:
        raise InvalidArgument(f"batch_size must be >= 0 (0 = automatic), got {batch_size}")
    results: list[R] = []
    n = len(items)
    pos = 0
    tuning = batch_size == 0
    size = 1 if tuning else batch_size
    best_size, best_rate = size, 0.0
    while pos < n:
        chunk = items[pos : pos + size]
        start = time.perf_counter()
        try:
            out = fn(chunk)
        except (RuntimeError, torch.OutOfMemoryError) as exc:
            if not is_oom(exc):
                raise
            free_memory()
            if size == 1:
                raise ResourceExhausted("out of memory even at batch size 1") from exc
            log.warning("out of memory at batch size %d; falling back", size)
            size = best_size if tuning and best_size < size else max(1, size // 2)
            tuning = False
            continue
        elapsed = max(time.perf_counter() - start, 1e-9)
        results.extend(out)
        pos += len(chunk)
        if progress:
            progress(pos, n)
        if tuning and len(chunk) == size:
            rate = len(chunk) / elapsed
            if rate > best_rate * _MIN_GAIN and size < cap:
                best_size, best_rate = size, rate
                size = min(size * 2, cap)
            else:
                if rate > best_rate:
                    best_size = size
                size, tuning = best_size, False
                log.info("automatic batch size: %d", size)
        if until_tuned and not tuning:
            break
    if batch_size:
        return BatchedRun(results, batch_size, True)
    return BatchedRun(results, best_size, not tuning)


def measure_batch_size(
    n_items: int, run_sample: Callable[[int], object], cap: int = DEFAULT_BATCH_CAP, smallest: int = 8
) -> int:
    """The batch size with the best measured throughput for ``n_items`` items (results discarded).

    ``run_sample(size)`` runs one batch of ``size`` representative items.
    Sizes ``smallest``, 2x, 4x ... up to ``min(cap, n_items)`` (the last one
    is ``n_items`` itself when it fits under the cap) are timed in turn, while
    each beats the one before by 5 %; an out-of-memory error ends the climb at
    the size before. For work whose cost per batch is mostly reading the
    weights (decode steps on a CPU), so that larger batches keep paying, where
    :func:`run_batched`'s climb from 1 on the real items would spend the first
    items on tiny batches and never reach a size larger than half of them.
    """
    top = min(cap, n_items)
    sizes, size = [], min(smallest, top)
    while size < top:
        sizes.append(size)
        size *= 2
    sizes.append(top)
    best_size, best_rate = sizes[0], 0.0
    for size in sizes:
        start = time.perf_counter()
        try:
            run_sample(size)
        except (RuntimeError, torch.OutOfMemoryError) as exc:
            if not is_oom(exc):
                raise
            free_memory()
            if best_rate == 0.0:
                raise ResourceExhausted(f"out of memory at batch size {size}") from exc
            break
        rate = size / max(time.perf_counter() - start, 1e-9)
        if rate <= best_rate * _MIN_GAIN:
            break
        best_size, best_rate = size, rate
    log.info("measured batch size: %d", best_size)
    return best_size
