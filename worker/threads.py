"""The threads a worker starts beside its work, and the events they wait on, in one place.

A run works its calls in flight on threads (``worker/inflight.py``), lists on a helper thread
(``worker/batch.py``), and keeps its leases from another (``worker/queue/leases.py``); every worker
process keeps the window from one more (``worker/keeper.py``). They start here and wait on events
made here, so that the seeded simulation of faults (``tests/simulation/``) can put threads of its
own in their place (greenlets its scheduler runs, on its clock) and run that very code, the
production call path, under its schedule.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol


class Event(Protocol):
    def set(self) -> None: ...

    def clear(self) -> None: ...

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


class Thread(Protocol):
    def join(self, timeout: float | None = None) -> None: ...

    def is_alive(self) -> bool: ...


class Threads(Protocol):
    def start(self, target: Callable[[], object], name: str) -> Thread:
        """Run ``target`` on a new daemon thread."""
        ...

    def event(self) -> Event: ...


class SystemThreads:
    def start(self, target: Callable[[], object], name: str) -> Thread:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        return thread

    def event(self) -> Event:
        return threading.Event()


_threads: Threads = SystemThreads()


def start(target: Callable[[], object], name: str) -> Thread:
    return _threads.start(target, name)


def event() -> Event:
    return _threads.event()


@contextmanager
def using(threads: Threads) -> Iterator[Threads]:
    """Start threads and make events with ``threads`` while the block runs (the simulation's own)."""
    global _threads
    previous, _threads = _threads, threads
    try:
        yield threads
    finally:
        _threads = previous
