"""The Celery app workers run: ``celery -A worker.celery_app worker``.

Each task is a thin wrapper over a plain function of :mod:`worker.tasks` (which the seeded
simulation of faults runs too). Each worker process builds its :class:`WorkerContext` (database
engine, boto3 clients) once, when the process starts (``worker_process_init``), from the
environment's settings; a recognizer is built the first time a batch of a scan that uses it
arrives, so any plain worker serves any scan.

Each run of a message claims with a token of its own (the message id and a random suffix), so two
deliveries of one message never share a claim. A run works at most ``CELEBSCAN_BATCH_SECONDS``
(at most half the visibility timeout); Celery's soft and hard time limits, later still, end a run
that hangs, well before Redis would hand its message to another worker. A message that cannot be
sent on (the broker is away) is rejected back onto its queue rather than lost.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid

from celery.exceptions import Reject
from celery.signals import worker_process_init
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy.exc import InterfaceError, OperationalError

from worker.batch import WorkerContext, process_batch
from worker.broker import CeleryRedisBroker
from worker.celery_config import (
    LIST_TASK_NAME,
    SLOT_TASK_NAME,
    TASK_NAME,
    make_celery,
    send_listing_parts,
    time_limits,
)
from worker.errors import RecognizerUnavailableError
from worker.keeper import WindowKeeper, keep_the_window_in_a_thread
from worker.listing_parts import LIST_SLICE_SECONDS
from worker.queue.slots import SlotMessage
from worker.settings import Settings
from worker.tasks import HAND_BACK_SECONDS, run_listing_part, run_window_slot

log = logging.getLogger(__name__)

settings = Settings.from_env()
app = make_celery(settings)
window_broker = CeleryRedisBroker(app, settings.broker_url)
_context: WorkerContext | None = None
TIME_LIMITS = time_limits(settings)


def worker_context() -> WorkerContext:
    """This process's context, built on first use (the solo pool sends no process-init signal),
    with the window's keeper beside it (``worker/keeper.py``: one process of the fleet keeps it)."""
    global _context
    if _context is None:
        _context = WorkerContext.from_settings(settings)
        keep_the_window_in_a_thread(WindowKeeper(_context.store.engine, window_broker, settings.lease_seconds))
    return _context


@worker_process_init.connect
def _build_context(**_) -> None:
    worker_context()


def _context_or_sent_back(send_back) -> WorkerContext | None:
    """This process's context; when it cannot be built (the database is away as a replaced pool
    process starts), the message is sent back for later and None returned: never lost."""
    try:
        return worker_context()
    except Exception as exc:
        log.warning("this worker cannot reach what it needs yet (%s); the message is sent back for later", exc)
        _sending_or_requeued(send_back)
        return None


def _run_token(request) -> str:
    return f"{request.id}:{uuid.uuid4().hex[:8]}"


def _sending_or_requeued(send) -> None:
    """Send a message on; when the broker cannot take it, put this one back on its queue instead."""
    try:
        send()
    except (BrokerError, OSError) as exc:
        raise Reject(f"cannot send the message on: {exc}", requeue=True) from exc


@app.task(
    name=TASK_NAME,
    bind=True,
    max_retries=None,
    autoretry_for=(OperationalError, InterfaceError),
    retry_backoff=2,
    retry_backoff_max=120,
    **TIME_LIMITS,
)
def process_batch_task(self, image_ids: list[int]) -> dict:
    """A list of image ids: the messages scans sent before the window (still served after an upgrade)."""
    context = worker_context()
    try:
        report = process_batch(image_ids, context, _run_token(self.request))
    except RecognizerUnavailableError as exc:
        log.warning("handing back a batch of %d: %s", len(image_ids), exc)
        raise self.retry(countdown=HAND_BACK_SECONDS) from exc
    log.info("batch of %d: %s", len(image_ids), report)
    if report.deferred or report.released:
        countdown = min(report.resend_after, settings.visibility_timeout / 2)  # an ETA past it would be redelivered
        raise self.retry(countdown=countdown)
    return dataclasses.asdict(report)


@app.task(name=SLOT_TASK_NAME, bind=True, **TIME_LIMITS)
def take_next_batch_task(self, scan_id: int, slot: int | None = None, generation: int | None = None, **_) -> dict:
    """A window slot: take it, claim and process the scan's next batch, then send the slot on
    (or park it, or end it with its scan). A message from before window slots were kept in the
    database (no slot named) gives its scan a window there and does nothing more."""
    try:
        context = worker_context()
    except Exception as exc:  # the database is away as a replaced pool process starts
        log.warning("this worker cannot reach what it needs yet (%s); the message comes back later", exc)
        raise self.retry(countdown=HAND_BACK_SECONDS, max_retries=None) from exc
    if slot is None or generation is None:
        context.scans.give_window(scan_id, settings.window)
        return {}
    message = SlotMessage(scan_id, slot, generation)
    report = run_window_slot(message, context, _run_token(self.request), window_broker.send)
    return dataclasses.asdict(report)


@app.task(name=LIST_TASK_NAME, bind=True, **TIME_LIMITS)
def list_part_task(self, part_id: int) -> dict:
    """A part of a scan's key space: list it for a slice, then send it on (or end it)."""

    def send_on(part: int, countdown: float) -> None:
        _sending_or_requeued(lambda: send_listing_parts(app, [part], countdown=countdown))

    context = _context_or_sent_back(lambda: send_on(part_id, HAND_BACK_SECONDS))
    if context is None:
        return {}
    step = run_listing_part(
        part_id,
        context,
        _run_token(self.request),
        send_on,
        slice_seconds=min(LIST_SLICE_SECONDS, settings.visibility_timeout / 4),
    )
    return dataclasses.asdict(step)
