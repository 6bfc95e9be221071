"""The time every lease, deadline and backoff reads, in one place.

Production code asks this module for the time and for its waits. The seeded simulation of faults
(``tests/simulation/``) puts a clock of its own here, so that leases expire, backoffs pass and
deadlines fall when its schedule says, and a run replays exactly from its seed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """The wall-clock time, UTC: what leases and deadlines stored in the database compare with."""
        ...

    def monotonic(self) -> float:
        """Seconds from an arbitrary start, never going back: for slices and timeouts in a process."""
        ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


_clock: Clock = SystemClock()


def utcnow() -> datetime:
    return _clock.now()


def monotonic() -> float:
    return _clock.monotonic()


def sleep(seconds: float) -> None:
    _clock.sleep(seconds)


@contextmanager
def using(clock: Clock) -> Iterator[Clock]:
    """Read the time from ``clock`` while the block runs (the simulation's own clock)."""
    global _clock
    previous, _clock = _clock, clock
    try:
        yield clock
    finally:
        _clock = previous
