"""The embedded scan's workers: this process and a local process pool, claiming a scan's batches
from the database (no broker).

Each of them builds its :class:`WorkerContext` once (models, engine), a pool process in the
initializer as a Celery worker does in ``worker_process_init``, then takes the scan's batches one
after another (the same :func:`worker.batch.take_next_batch` a Celery window slot runs) until
nothing is left to wait for. The local face models use one core per process, so the default is one
process per core, this one included.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from typing import Protocol

from worker import clock
from worker.batch import BatchReport, WorkerContext, take_next_batch
from worker.database import engine_for
from worker.queue.scans import Scans
from worker.settings import Settings

log = logging.getLogger(__name__)


class Stop(Protocol):
    """Asks the drain to stop after the turn in hand (a ``threading.Event``, or a spawn context's
    ``multiprocessing.Event`` for a pool)."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...

    def set(self) -> None: ...


#: An embedded drain never sleeps longer than this when it finds nothing to claim: the listing
#: runs beside it, and a drain that slept long would only delay the end of the scan.
EMBEDDED_MAX_IDLE_SECONDS = 0.5

_process_context: WorkerContext | None = None
_process_error: BaseException | None = None
_process_stop: Stop | None = None


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def drain_scan(
    settings: Settings,
    scan_id: int,
    workers: int,
    on_progress: Callable[[], None] = lambda: None,
    stop: Stop | None = None,
) -> BatchReport:
    """Process the scan's images until it is finished (or nothing is left that may come, or
    ``stop`` is set: a followed source's scan goes on until then) in ``workers`` processes: this
    one, and ``workers - 1`` in a process pool (``stop`` then made by :func:`pool_stop`). ``on_progress`` is
    called every half second or so, for a progress bar."""
    with _draining(settings, scan_id):
        if workers <= 1:
            return drain(_context_for(settings), scan_id, on_progress, stop)
        return _drain_in_pool(settings, scan_id, workers, on_progress, stop)


def _drain_in_pool(settings: Settings, scan_id: int, workers: int, on_progress, stop: Stop | None) -> BatchReport:
    """This process drains beside ``workers - 1`` pool processes: it takes its first batch while
    they start (the fork server's imports, then the models), and N cores need N - 1 of them.

    They stop after the turn in hand once this process's drain ends (the scan done, ``stop``, an
    error); a pool process's error is raised here at the turn after it. Each side's idle wait ends
    when the other's drain does, so the last image's writer does not wait out a pause to notice
    that the scan is done (and ``stop``, which the pool's processes wait on, ends theirs)."""
    drained_here = stop if stop is not None else pool_stop()
    with _pool(settings, workers - 1, drained_here, sharers=workers) as pool:
        futures: list[Future] = []

        def start_pool() -> None:  # each submit waits for the fork server to fork its process
            try:
                for _ in range(workers - 1):
                    if drained_here.is_set():  # the scan ended first (nothing new in it, say)
                        return
                    futures.append(pool.submit(_drain_in_process, scan_id))
            except Exception as exc:  # this process still drains the scan, alone
                log.warning("the scan's pool processes did not start: %s", exc)

        starter = threading.Thread(target=start_pool, name="celebscan-pool-start", daemon=True)
        starter.start()  # while this process loads its models: the fork server's imports take as long

        def step() -> None:
            on_progress()
            for future in futures:
                if future.done() and future.exception() is not None:
                    raise future.exception()  # type: ignore[misc]

        def pause(seconds: float) -> None:
            running = [future for future in futures if not future.done()]
            if running:
                wait(running, timeout=seconds, return_when=FIRST_COMPLETED)
            else:
                clock.sleep(seconds)

        try:
            context = _context_for(settings, sharers=workers)
            total = drain(context, scan_id, step, stop, pause)
        finally:
            drained_here.set()
            starter.join()
        while True:
            _, running = wait(futures, timeout=EMBEDDED_MAX_IDLE_SECONDS, return_when=FIRST_EXCEPTION)
            on_progress()
            if not running or any(future.done() and future.exception() for future in futures):
                break
        for future in futures:
            total += future.result()  # raises what a pool process raised
    return total


def _context_for(settings: Settings, sharers: int = 1) -> WorkerContext:
    """A process's context with the scan's recognizer built (models loaded): a missing extra stops
    the scan before any image."""
    context = WorkerContext.from_settings(settings)
    context.claim_sharers = sharers
    context.recognizers.get(settings.backend)
    return context


@contextmanager
def _draining(settings: Settings, scan_id: int) -> Iterator[None]:
    """Renew the scan's lease every quarter lease while it is drained here: a later scan of the same
    source leaves its queued images to this one."""
    scans = Scans(engine_for(settings.database_url))
    stop = threading.Event()

    def renew() -> None:
        while True:
            try:
                scans.note_draining(scan_id)
            except Exception as exc:  # the database is away: the next round tries again
                log.warning("could not renew scan %d's lease: %s", scan_id, exc)
            if stop.wait(settings.lease_seconds / 4):
                return

    keeper = threading.Thread(target=renew, name=f"draining-{scan_id}", daemon=True)
    keeper.start()
    try:
        yield
    finally:
        stop.set()
        keeper.join()
        scans.engine.dispose()


def drain(
    context: WorkerContext,
    scan_id: int,
    on_step: Callable[[], None] = lambda: None,
    stop: Stop | None = None,
    pause: Callable[[float], object] | None = None,
) -> BatchReport:
    """Take the scan's batches until there is nothing left to wait for (or ``stop`` is set);
    returns what was done. With nothing to claim yet it waits by ``pause`` (by default until
    ``stop`` is set or the time is up)."""
    pause = pause or (stop.wait if stop is not None else clock.sleep)
    process = f"embedded:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    total, idle_rounds, turn = BatchReport(), 0, 0
    while stop is None or not stop.is_set():  # each turn is a run with a claim token of its own, as a slot's
        step = take_next_batch(scan_id, context, f"{process}:{turn}", idle_rounds, max_idle=EMBEDDED_MAX_IDLE_SECONDS)
        total, turn, idle_rounds = total + step.report, turn + 1, step.idle_rounds
        on_step()
        if step.next_in is None:
            return total
        if step.next_in:
            pause(step.next_in)  # nothing to claim yet: the listing or a deferred image is due then
    return total


def pool_stop():
    """An event that stops the drains of a pool's processes (made in the pool's own context)."""
    return _context().Event()


def _pool(settings: Settings, workers: int, stop: Stop | None = None, sharers: int = 1) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(
        workers,
        mp_context=_context(),
        initializer=_init_process,
        initargs=(settings, stop, dict(os.environ), sharers),
    )


#: What the fork server imports once, before it forks the pool's processes.
PRELOAD = ("producer.local_pool", "worker.recognizers.local", "worker.recognizers.rekognition", "producer.fork_server")


def _context():
    """Forked from a fork server, not forked from this process nor spawned. A fork of this process
    copies whatever it holds (broker connections whose after-fork clean-up can block, the listing
    thread's locks). A spawned process imports everything again, and the command's own module
    too: ~1 s of CPU each, a quarter of a 60-image local scan once the face models got fast. The
    fork server is a fresh process that imports the modules (and the ``celebscan`` script) once and
    holds nothing else; the pool's processes fork from it ready to load their models. Measured on
    faces-dev (60 images, 2 processes): docs/performance.md. (Run as ``python -m producer.cli``, each
    process still imports that module itself: preloading it too makes runpy warn in each.)"""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", *PRELOAD])
    return context


def _init_process(settings: Settings, stop: Stop | None, environment: dict[str, str], sharers: int) -> None:
    """Take the command's environment, then build the context and the scan's recognizer (models
    loaded) before the first batch arrives.

    The fork server keeps the environment of the moment it started, for as long as the process
    that started it lives: a second scan in that process (a notebook, the tests) with other AWS
    endpoints or credentials would otherwise call the first one's."""
    global _process_context, _process_error, _process_stop
    os.environ.clear()
    os.environ.update(environment)
    _process_stop = stop
    logging.basicConfig(level=logging.WARNING)
    try:
        _process_context = _context_for(settings, sharers)
    except BaseException as exc:  # handed to the parent with the first batch, where the CLI reports it
        _process_error = exc


def _drain_in_process(scan_id: int) -> BatchReport:
    if _process_error is not None:
        raise _process_error
    assert _process_context is not None
    return drain(_process_context, scan_id, stop=_process_stop)
