"""Handing a scan to the workers through the broker, by task name (the producer never imports the
recognizers or dlib)."""

from __future__ import annotations

from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy import Engine

from worker.broker import PIPELINE_SIZE, CeleryRedisBroker
from worker.celery_config import make_celery, send_listing_parts
from worker.errors import ConfigurationError
from worker.queue.scans import Scans
from worker.queue.slots import WindowSlots
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


def open_window(
    settings: Settings, engine: Engine, scan_id: int, listing_parts: list[int] | tuple[int, ...] = (), window=None
) -> int:
    """Hand the scan to the workers: first one message per part of its key space for them to list
    (``worker/listing_parts.py``), then its window slots (made with the scan, or given now to a scan
    that had none: ``window`` of them, else ``CELEBSCAN_WINDOW``) sent at once rather than at the
    window keeper's next round. Returns the scan's window."""
    size = Scans(engine).give_window(scan_id, window or settings.window)
    slots = WindowSlots(engine, settings.lease_seconds)
    with make_celery(settings) as app:
        try:
            with app.producer_or_acquire() as producer, producer.batch(max_size=PIPELINE_SIZE):
                send_listing_parts(app, list(listing_parts), producer=producer)
        except (BrokerError, OSError) as exc:
            raise ConfigurationError(f"enqueueing to {masked_broker(settings.broker_url)} failed: {exc}") from exc
        slots.unsend(CeleryRedisBroker(app, settings.broker_url).send(slots.dispatch(scan_id=scan_id)))
    return size
