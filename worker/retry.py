"""The retry policy, in one place: only ``TransientError`` is retried, with exponential backoff."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from tenacity import Retrying, before_sleep_log, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from worker.errors import TransientError

log = logging.getLogger(__name__)
T = TypeVar("T")


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
    )
    return retrying(func)
