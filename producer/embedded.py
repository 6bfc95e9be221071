"""Running a scan's batches without a broker: a local process pool calling the same batch function.

Each pool process builds its :class:`WorkerContext` once (models, engine) in the initializer, as a
Celery worker does in ``worker_process_init``. dlib uses one core per process, so the default is
one process per core.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from typing import Protocol

from worker.batch import BatchReport, WorkerContext, process_batch
from worker.settings import Settings

log = logging.getLogger(__name__)

_process_context: WorkerContext | None = None
_process_error: BaseException | None = None


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_batches(
    batches: Sequence[Sequence[int]],
    settings: Settings,
    workers: int,
    on_batch_done: Callable[[int, BatchReport], None] = lambda size, report: None,
) -> BatchReport:
    """Process every batch; ``workers == 1`` runs in this process, more in a process pool.

    ``on_batch_done`` is told how many images a batch settled (done or failed). Images deferred by
    a transient cause are run again after the delay their batch asked for, until they settle.
    """
    if workers <= 1:
        context = WorkerContext.from_settings(settings)
        context.recognizers.get(settings.backend)  # a missing extra stops the scan before any image
        return _drain(_InThisProcess(lambda batch: process_batch(batch, context)), batches, on_batch_done)
    with _pool(settings, workers) as pool:
        return _drain(_Submitting(pool, _run_in_process), batches, on_batch_done)


def _drain(
    runner: _Runner, batches: Sequence[Sequence[int]], on_batch_done: Callable[[int, BatchReport], None]
) -> BatchReport:
    total = BatchReport()
    order = itertools.count()
    later: list[tuple[float, int, Sequence[int]]] = []  # (due, tie-breaker, image ids) to run again
    running: dict[Future, Sequence[int]] = {runner.submit(batch): batch for batch in batches}
    while running or later:
        while later and later[0][0] <= time.monotonic():
            batch = heapq.heappop(later)[2]
            running[runner.submit(batch)] = batch
        timeout = max(0.0, later[0][0] - time.monotonic()) if later else None
        if not running and timeout is not None:
            time.sleep(timeout)  # every image left is waiting out its backoff
            continue
        finished, _ = wait(running, timeout=timeout, return_when=FIRST_COMPLETED)
        for future in finished:
            batch = running.pop(future)
            report = future.result()
            total = BatchReport(
                done=total.done + report.done,
                failed=total.failed + report.failed,
                skipped=total.skipped + report.skipped,
            )
            on_batch_done(len(batch) - len(report.deferred), report)
            if report.deferred:
                log.info("%d images deferred for %.0f s", len(report.deferred), report.resend_after)
                heapq.heappush(later, (time.monotonic() + report.resend_after, next(order), list(report.deferred)))
    return total


class _Runner(Protocol):
    def submit(self, batch: Sequence[int]) -> Future: ...


class _Submitting:
    def __init__(self, executor: Executor, function: Callable[[Sequence[int]], BatchReport]) -> None:
        self.executor, self.function = executor, function

    def submit(self, batch: Sequence[int]) -> Future:
        return self.executor.submit(self.function, batch)


class _InThisProcess:
    """Runs each batch as it is submitted and hands back its finished future."""

    def __init__(self, function: Callable[[Sequence[int]], BatchReport]) -> None:
        self.function = function

    def submit(self, batch: Sequence[int]) -> Future:
        future: Future = Future()
        try:
            future.set_result(self.function(batch))
        except BaseException as exc:
            future.set_exception(exc)
        return future


def _pool(settings: Settings, workers: int) -> ProcessPoolExecutor:
    """Spawned, not forked: a fork copies whatever the parent holds (broker connections whose
    after-fork clean-up can block, other threads' locks); tried and measured at 0.3 s saved of 11."""
    spawn = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(workers, mp_context=spawn, initializer=_init_process, initargs=(settings,))


def _init_process(settings: Settings) -> None:
    """Build the context and the scan's recognizer (models loaded) before the first batch arrives."""
    global _process_context, _process_error
    logging.basicConfig(level=logging.WARNING)
    try:
        _process_context = WorkerContext.from_settings(settings)
        _process_context.recognizers.get(settings.backend)
    except BaseException as exc:  # handed to the parent with the first batch, where the CLI reports it
        _process_error = exc


def _run_in_process(batch: Sequence[int]) -> BatchReport:
    if _process_error is not None:
        raise _process_error
    assert _process_context is not None
    return process_batch(batch, _process_context)
