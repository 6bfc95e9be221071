"""The time every lease, deadline and backoff reads, in one place.

Production code asks this module for the time and for its waits. The seeded simulation of faults
(``tests/simulation/``) puts a clock of its own here, so that leases expire, backoffs pass and
deadlines fall when its schedule says, and a run replays exactly from its seed.

One clock for leases: the database's. Workers on many machines compare leases that others wrote
(a claim is taken over once its holder has not renewed it for a lease), so the wall-clock time
here is the database server's: each process measures how far its own clock is from the server's
when it first connects, and again every few minutes (``worker.database.align_clock``), and adds
the difference. A machine whose clock is minutes off then still dates its leases as the others do;
what is left is the measurement's error (half a round trip) and the drift between two measurements.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
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
    def __init__(self, time_source: Callable[[], float] = time.time) -> None:
        self._time = time_source
        #: Seconds the reference clock (the database server's) is ahead of this machine's.
        self.offset = 0.0
        #: When the offset was last measured (monotonic seconds; None: never).
        self.aligned_at: float | None = None

    def now(self) -> datetime:
        return datetime.fromtimestamp(self._time() + self.offset, UTC)

    def align(self, read_reference: Callable[[], float]) -> float:
        """Measure the offset of the reference clock (``read_reference`` returns its time, in
        seconds since the epoch), taking half the round trip as its moment; returns the offset."""
        sent = self._time()
        reference = read_reference()
        received = self._time()
        self.offset = reference - (sent + received) / 2
        self.aligned_at = time.monotonic()
        return self.offset

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


_clock: Clock = SystemClock()


def utcnow() -> datetime:
    return _clock.now()


def system_clock() -> SystemClock | None:
    """The production clock, or None while another (the simulation's) is in use."""
    return _clock if isinstance(_clock, SystemClock) else None


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
