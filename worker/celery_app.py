"""The Celery app workers run: ``celery -A worker.celery_app worker``.

The task is a thin wrapper over :func:`worker.batch.process_batch`. Each worker process builds its
:class:`WorkerContext` (database engine, boto3 clients) once, when the process starts
(``worker_process_init``), from the environment's settings; a recognizer is built the first time
a batch of a scan that uses it arrives, so any plain worker serves any scan.

Two hand-backs send a batch to the broker again instead of failing images: a worker that cannot
run what the batch needs (its scan is told, for ``status``), and images whose transient errors
(throttling, 5xx) outlasted the in-process retries (re-sent with a growing countdown, kept short
of Redis's visibility timeout).
"""

from __future__ import annotations

import dataclasses
import logging
import random

from celery.signals import worker_process_init
from sqlalchemy.exc import InterfaceError, OperationalError

from worker.batch import WorkerContext, process_batch, take_next_batch
from worker.celery_config import (
    LIST_TASK_NAME,
    SLOT_TASK_NAME,
    TASK_NAME,
    make_celery,
    send_listing_parts,
    send_window_slots,
)
from worker.errors import RecognizerUnavailableError
from worker.listing_parts import LIST_SLICE_SECONDS, list_part
from worker.settings import Settings

log = logging.getLogger(__name__)

settings = Settings.from_env()
app = make_celery(settings)
_context: WorkerContext | None = None
#: Seconds before a batch this worker could not serve is offered again (to any worker).
HAND_BACK_SECONDS = 30


def worker_context() -> WorkerContext:
    """This process's context, built on first use (the solo pool sends no process-init signal)."""
    global _context
    if _context is None:
        _context = WorkerContext.from_settings(settings)
    return _context


@worker_process_init.connect
def _build_context(**_) -> None:
    worker_context()


#: The database being briefly unreachable is worth waiting for: the message is re-sent with
#: backoff. Other database errors are bugs: the task fails at once, its images stay queued.
DATABASE_RETRIES = {
    "autoretry_for": (OperationalError, InterfaceError),
    "retry_backoff": 2,
    "retry_backoff_max": 120,
    "retry_jitter": True,
    "max_retries": 30,
}


@app.task(name=TASK_NAME, bind=True, **DATABASE_RETRIES)
def process_batch_task(self, image_ids: list[int]) -> dict:
    """A list of image ids: the messages scans sent before the window (still served after an upgrade)."""
    context = worker_context()
    try:
        # A message redelivered after a crash keeps its id and retry number; a retry is a new message.
        report = process_batch(image_ids, context, delivery=f"{self.request.id}:{self.request.retries}")
    except RecognizerUnavailableError as exc:
        log.warning("handing back a batch of %d: %s", len(image_ids), exc)
        context.store.note_unserved(image_ids, str(exc))
        raise self.retry(countdown=random.uniform(HAND_BACK_SECONDS / 2, HAND_BACK_SECONDS), max_retries=None) from exc
    log.info("batch of %d: %s", len(image_ids), report)
    if report.deferred:
        countdown = min(report.resend_after, settings.visibility_timeout / 2)  # an ETA past it would be redelivered
        raise self.retry(args=[list(report.deferred)], countdown=countdown, max_retries=None)
    return dataclasses.asdict(report)


@app.task(name=SLOT_TASK_NAME, bind=True, **DATABASE_RETRIES)
def take_next_batch_task(self, scan_id: int, idle_rounds: int = 0) -> dict:
    """A window slot: claim and process the scan's next batch, then send the slot on (or end it)."""
    context = worker_context()
    try:
        step = take_next_batch(scan_id, context, f"{self.request.id}:{self.request.retries}", idle_rounds)
    except RecognizerUnavailableError as exc:
        log.warning("handing back a batch of scan %d: %s", scan_id, exc)
        context.store.note_unserved_scan(scan_id, str(exc))
        raise self.retry(countdown=random.uniform(HAND_BACK_SECONDS / 2, HAND_BACK_SECONDS), max_retries=None) from exc
    if step.next_in is not None:
        countdown = min(step.next_in, settings.visibility_timeout / 2)
        send_window_slots(app, scan_id, countdown=countdown, idle_rounds=step.idle_rounds)
    return dataclasses.asdict(step.report)


@app.task(name=LIST_TASK_NAME, bind=True, **DATABASE_RETRIES)
def list_part_task(self, part_id: int) -> dict:
    """A part of a scan's key space: list it for a slice, then send it on (or end it)."""
    context = worker_context()
    step = list_part(
        part_id,
        context.listing_parts,
        context.s3_lister,
        f"{self.request.id}:{self.request.retries}",
        slice_seconds=min(LIST_SLICE_SECONDS, settings.visibility_timeout / 4),
        attempts=settings.max_attempts,
    )
    if step.next_in is not None and step.part_id is not None:
        send_listing_parts(app, [step.part_id], countdown=step.next_in)
    return dataclasses.asdict(step)
