"""The retry policy, in one place: only what can succeed on retry is retried, with exponential backoff.

Two kinds: calls to a service or store that raised a ``TransientError``, bounded by attempts; and the
workers' writes to the results database while it is unreachable, bounded by time, so that results
already paid for are kept through a database restart.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from tenacity import (
    Retrying,
    before_sleep_log,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from worker import clock
from worker.errors import TransientError

log = logging.getLogger(__name__)
T = TypeVar("T")


def doubling(base: float, rounds: int, most: float) -> float:
    """``base`` doubled ``rounds`` times, at most ``most``. An idle slot or drain counts its rounds for
    as long as it waits (a followed source with no uploads: for days); 2.0 ** 1024 would overflow."""
    return min(base * 2.0 ** min(max(0, rounds), 64), most)


def call_with_retry(func: Callable[[], T], *, attempts: int, max_wait: float = 30.0, base: float = 0.5) -> T:
    """Call ``func``; on a transient error wait (full jitter, growing ×2) and try again, up to ``attempts``.

    The last transient error is re-raised when the attempts run out; any other error at once.
    """
    retrying = Retrying(
        retry=retry_if_exception_type(TransientError),
        wait=wait_random_exponential(multiplier=base, max=max_wait),
        stop=stop_after_attempt(attempts),
        reraise=True,
        before_sleep=before_sleep_log(log, logging.INFO),
        sleep=clock.sleep,
    )
    return retrying(func)


#: How long a worker keeps trying to reach the results database before giving the batch back.
DATABASE_PATIENCE_SECONDS = 300


def retry_database(func: Callable[..., T]) -> Callable[..., T]:
    """Retry ``func`` while the database is unreachable or locked, or every pooled connection is
    busy (full jitter, up to 15 s apart)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs) -> T:
        retrying = Retrying(
            retry=retry_if_exception_type((OperationalError, InterfaceError, PoolTimeoutError)),
            wait=wait_random_exponential(multiplier=0.5, max=15),
            stop=stop_after_delay(DATABASE_PATIENCE_SECONDS),
            reraise=True,
            before_sleep=before_sleep_log(log, logging.WARNING),
            sleep=clock.sleep,
        )
        return retrying(func, *args, **kwargs)

    return wrapper
