"""Handing batches to the broker by task name (the producer never imports the worker's code)."""

from __future__ import annotations

from collections.abc import Sequence

from kombu.exceptions import OperationalError as BrokerError

from worker.celery_config import TASK_NAME, make_celery
from worker.errors import ConfigurationError
from worker.settings import Settings


def masked_broker(url: str) -> str:
    from kombu.utils.url import maybe_sanitize_url

    return maybe_sanitize_url(url)


def check_broker(settings: Settings) -> None:
    """Fail before a scan is created when the broker cannot be reached."""
    with make_celery(settings) as app:
        try:
            with app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, timeout=5)
        except (BrokerError, OSError) as exc:
            raise ConfigurationError(f"cannot reach the broker {masked_broker(settings.broker_url)}: {exc}") from exc


#: Messages buffered in one Redis pipeline before it is flushed.
PIPELINE_SIZE = 1000


def enqueue_batches(settings: Settings, batches: Sequence[Sequence[int]]) -> int:
    """Send one task message per batch, pipelined over one connection; returns the number sent.

    ``Producer.batch`` (kombu ≥ 5.7) buffers the publishes in Redis pipelines; a short ``argsrepr``
    spares Celery from repr-ing every id (a third of the cost) and reads better in Flower.
    """
    sent = 0
    with make_celery(settings) as app:  # closing it closes its connection pool
        try:
            with app.producer_or_acquire() as producer, producer.batch(max_size=PIPELINE_SIZE):
                for batch in batches:
                    app.send_task(
                        TASK_NAME,
                        args=[list(batch)],
                        producer=producer,
                        argsrepr=f"[{len(batch)} image ids from {batch[0]}]",
                        kwargsrepr="{}",
                    )
                    sent += 1
        except (BrokerError, OSError) as exc:
            raise ConfigurationError(f"enqueueing to {masked_broker(settings.broker_url)} failed: {exc}") from exc
    return sent
