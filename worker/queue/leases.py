"""Leases that live holders renew.

A claim (on images, on the pictures a run is calling for, on a listing part, on a window slot) lasts
``CELEBSCAN_LEASE_SECONDS`` from its last renewal; then any other holder, or ``scan --resume``,
may take it over. A live holder renews everything it holds every quarter lease, from a thread
beside its work, so a slow call or a long retry never loses its claims, while a crashed holder's
claims come free within one lease. Renewal stops at a deadline the run names (twice
``CELEBSCAN_BATCH_SECONDS``: time to start its images, then as long to see its calls back): a run
that hangs past it loses its claims like a crashed one, and the task's time limits end it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterator
from contextlib import AbstractContextManager, contextmanager

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from worker import clock, threads
from worker.database import align_clock
from worker.queue import images, parts, pictures, slots

log = logging.getLogger(__name__)
#: Renewals never come closer than this (a lease of a second or less is a test's).
MIN_RENEWAL_SECONDS = 0.25

#: The tokens of a run, read at each renewal (a run takes a token for each batch it claims).
Tokens = Callable[[], Collection[str]]
#: Builds the context that keeps a run's leases while it works: (engine, the run's tokens, lease
#: seconds, run deadline on the clock's monotonic time or None) -> context manager.
LeaseKeeping = Callable[[Engine, Tokens, float, "float | None"], AbstractContextManager]


def renew_all(engine: Engine, tokens: Collection[str]) -> None:
    """Renew every claim the ``tokens`` hold, in one transaction."""
    now = clock.utcnow()
    tokens = list(tokens)
    with engine.begin() as conn:
        images.renew(conn, tokens, now)
        pictures.renew(conn, tokens, now)
        parts.renew(conn, tokens, now)
        slots.renew(conn, tokens, now)


@contextmanager
def keep_leases_in_a_thread(
    engine: Engine, tokens: Tokens, lease_seconds: float, deadline: float | None = None
) -> Iterator[None]:
    """Renew the leases of the run's ``tokens`` every quarter lease while the block runs (until ``deadline``)."""
    token = next(iter(tokens()))
    stop = threads.event()

    def renew_until_stopped() -> None:
        while not stop.wait(max(lease_seconds / 4, MIN_RENEWAL_SECONDS)):
            if deadline is not None and clock.monotonic() > deadline:
                log.warning("run %s passed its deadline: its leases are no longer renewed", token)
                return
            try:
                align_clock(engine)
                renew_all(engine, tokens())
            except SQLAlchemyError as exc:  # the database is away: the next round tries again
                log.warning("could not renew the leases of run %s: %s", token, exc)

    keeper = threads.start(renew_until_stopped, name=f"lease-keeper-{token}")
    try:
        yield
    finally:
        stop.set()
        keeper.join()
