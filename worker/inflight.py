"""Calls in flight: how a run keeps many recognizer calls going at once, and pays once for a
picture whose copies are in flight together.

A paid recognizer answers in about a second and the account's quota is tens of calls a second,
so one worker process keeps ``CELEBSCAN_CALLS_IN_FLIGHT`` images in flight on threads (the
network waits, not the CPU); the local recognizer is CPU-bound and keeps one, worked in the run's
own thread. Both sit behind :class:`Lanes`, so the run's loop is the same for both. The lanes are
threads of ``worker/threads.py``, so the seeded simulation runs them as its own.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Generic, Protocol, TypeVar

from worker import clock, threads

T = TypeVar("T")
Key = TypeVar("Key")


class LaneInterrupted(Exception):
    """An image's work that a time limit cut short before it could end: it has no outcome."""


class Lanes(Protocol):
    """Where a run's images are worked: ``size`` at a time."""

    size: int

    def submit(self, call: Callable[[], T]) -> Future[T]: ...

    def wait_any(self, futures: Iterable[Future], timeout: float) -> set[Future]:
        """Those of ``futures`` done now or within ``timeout`` seconds (maybe none)."""
        ...

    def close(self) -> None:
        """Cancel what has not started and wait for what has."""
        ...


class ThreadLanes:
    """``size`` threads: for calls that wait on the network. Calls submitted beyond them wait their
    turn; only the run's own thread waits for what comes back."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._lock = threading.Lock()  # held for a few list operations, never across a wait
        self._waiting: deque[tuple[Future, Callable[[], object]]] = deque()
        self._closed = False
        self._work = threads.event()  # set while calls wait for a lane (or the lanes close)
        self._back = threads.event()  # set when a call came back
        self._lanes = [threads.start(self._lane, name=f"call-{number}") for number in range(size)]

    def submit(self, call: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            self._waiting.append((future, call))
            self._work.set()
        return future

    def _lane(self) -> None:
        while True:
            self._work.wait()
            with self._lock:
                if not self._waiting:
                    if self._closed:
                        return
                    self._work.clear()
                    continue
                future, call = self._waiting.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(call())
                except BaseException as exc:
                    future.set_exception(exc)
                    if not isinstance(exc, Exception):  # the thread is ending (a simulated crash)
                        raise
                finally:
                    self._back.set()

    def wait_any(self, futures: Iterable[Future], timeout: float) -> set[Future]:
        wanted = list(futures)
        deadline = clock.monotonic() + timeout
        while True:
            self._back.clear()  # before looking: a call back after the look sets it again
            done = {future for future in wanted if future.done()}
            left = deadline - clock.monotonic()
            if done or left <= 0 or not self._back.wait(left):
                return done

    def close(self) -> None:
        with self._lock:
            self._closed = True
            while self._waiting:
                self._waiting.popleft()[0].cancel()
            self._work.set()
        for lane in self._lanes:
            lane.join()


class InlineLanes:
    """One lane, worked in the caller's thread when it waits: for CPU-bound work (the local
    recognizer) and for the simulation, which must see every step in its own thread."""

    size = 1

    def __init__(self) -> None:
        self._waiting: deque[tuple[Future, Callable[[], object]]] = deque()

    def submit(self, call: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        self._waiting.append((future, call))
        return future

    def wait_any(self, futures: Iterable[Future], timeout: float) -> set[Future]:
        wanted = set(futures)
        done = {future for future in wanted if future.done()}
        while not done and self._waiting:
            future, call = self._waiting[0]
            try:
                self._waiting.popleft()
                if not future.set_running_or_notify_cancel():
                    continue
                future.set_result(call())
            except BaseException as exc:
                if not future.done():
                    future.set_exception(exc)
                if not isinstance(exc, Exception):  # a simulated crash: the run stops here
                    raise
            if future in wanted:
                done.add(future)
        if not done and not self._waiting:  # cut short by a time limit between two steps above
            for future in wanted:
                if not future.cancel() and not future.done():
                    future.set_exception(LaneInterrupted("its work was cut short"))
                done.add(future)
        return done

    def close(self) -> None:
        while self._waiting:
            self._waiting.popleft()[0].cancel()


def lanes_for(calls_in_flight: int) -> Lanes:
    return ThreadLanes(calls_in_flight) if calls_in_flight > 1 else InlineLanes()


class RunPictures(Generic[Key, T]):
    """The pictures one run has recognized, or is recognizing right now, by content.

    An image whose picture another image of the same run is being recognized for waits for that
    result and copies it: the database's picture lock cannot tell two images of one run apart.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # held for a few dictionary operations, never across a wait
        self._recognized: dict[Key, T] = {}
        self._busy: dict[Key, threads.Event] = {}

    def recognized(self, key: Key) -> T | None:
        with self._lock:
            return self._recognized.get(key)

    def first_or_wait(self, key: Key, patience: float) -> tuple[str, T | None]:
        """What an image of ``key`` does: ("copy", a result to copy), ("mine", None): it is now the
        one recognizing ``key`` and calls :meth:`finish` when done, or ("busy", None): another
        image of the run still has it after ``patience`` seconds (the image waits for a later turn).

        When the image that had it ends without a result (it failed, or was deferred) the waiting
        one takes the picture over.
        """
        while True:
            with self._lock:
                if key in self._recognized:
                    return "copy", self._recognized[key]
                busy = self._busy.get(key)
                if busy is None:
                    self._busy[key] = threads.event()
                    return "mine", None
            if not busy.wait(patience):
                return "busy", None

    def finish(self, key: Key, result: T | None) -> None:
        """The image that had ``key`` is done with it (``result`` None: nothing to copy)."""
        with self._lock:
            if result is not None:
                self._recognized.setdefault(key, result)
            busy = self._busy.pop(key, None)
        if busy is not None:
            busy.set()

    def add(self, key: Key, result: T) -> None:
        with self._lock:
            self._recognized.setdefault(key, result)
