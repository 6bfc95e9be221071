"""Handing batches to the broker by task name (the producer never imports the worker's code)."""

from __future__ import annotations

from kombu.exceptions import OperationalError as BrokerError

from worker.celery_config import make_celery, send_listing_parts, send_window_slots
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


def open_window(settings: Settings, scan_id: int, listing_parts: list[int] | tuple[int, ...] = ()) -> int:
    """Put the scan's window slots into the broker: ``settings.window`` small messages, each of
    which a worker turns into the scan's next batch, then sends on (``worker/batch.py``: ``take_next_batch``);
    first, one message per part of its key space for the workers to list (``worker/listing_parts.py``)."""
    with make_celery(settings) as app:
        try:
            with app.producer_or_acquire() as producer, producer.batch(max_size=PIPELINE_SIZE):
                send_listing_parts(app, list(listing_parts), producer=producer)
                send_window_slots(app, scan_id, settings.window, producer=producer)
        except (BrokerError, OSError) as exc:
            raise ConfigurationError(f"enqueueing to {masked_broker(settings.broker_url)} failed: {exc}") from exc
    return settings.window
