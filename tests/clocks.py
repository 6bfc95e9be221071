"""Clocks for tests (``worker.clock.using``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


class SteppingClock:
    """A clock that moves only when the test says: a lease runs out without waiting for it."""

    def __init__(self) -> None:
        self.moment = datetime.now(UTC)

    def now(self) -> datetime:
        return self.moment

    def monotonic(self) -> float:
        return self.moment.timestamp()

    def sleep(self, seconds: float) -> None:
        self.moment += timedelta(seconds=seconds)

    advance = sleep
