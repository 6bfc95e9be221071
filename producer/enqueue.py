"""Handing a scan to the workers through the broker, by task name (the producer never imports the
recognizers or the face models)."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Engine

from worker.broker import PIPELINE_SIZE, CeleryRedisBroker, WindowBroker
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
    from kombu.exceptions import OperationalError as BrokerError

    with make_celery(settings) as app:
        try:
            with app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, timeout=5)
        except (BrokerError, OSError) as exc:
            raise ConfigurationError(f"cannot reach the broker {masked_broker(settings.broker_url)}: {exc}") from exc


def open_window(
    settings: Settings, engine: Engine, scan_id: int, listing_parts: list[int] | tuple[int, ...] = (), window=None
) -> int:
    """Hand the scan to the workers through the broker (:func:`hand_to_workers`). Returns its window."""
    from kombu.exceptions import OperationalError as BrokerError

    with make_celery(settings) as app:

        def send_parts(part_ids: list[int]) -> None:
            try:
                with app.producer_or_acquire() as producer, producer.batch(max_size=PIPELINE_SIZE):
                    send_listing_parts(app, part_ids, producer=producer)
            except (BrokerError, OSError) as exc:
                raise ConfigurationError(f"enqueueing to {masked_broker(settings.broker_url)} failed: {exc}") from exc

        broker = CeleryRedisBroker(app, settings.broker_url)
        return hand_to_workers(
            engine, settings.lease_seconds, scan_id, list(listing_parts), window or settings.window, send_parts, broker
        )


def hand_to_workers(
    engine: Engine,
    lease_seconds: float,
    scan_id: int,
    listing_parts: list[int],
    window: int,
    send_parts: Callable[[list[int]], None],
    broker: WindowBroker,
) -> int:
    """First one message per part of the scan's key space for the workers to list
    (``worker/listing_parts.py``), then its window slots (made with the scan, or given now to a scan
    that had none) sent at once rather than at the window keeper's next round. Returns the window."""
    size = Scans(engine).give_window(scan_id, window)
    send_parts(listing_parts)
    slots = WindowSlots(engine, lease_seconds)
    slots.unsend(broker.send(slots.dispatch(scan_id=scan_id)))
    return size
