"""What a message does, whatever delivers it: Celery, or the seeded simulation of faults.

Every way a run can end sends its message on or gives back what it holds, so neither the window
nor a listing ever shrinks: a batch done or nothing to claim yet (the slot is sent on, or ends
with its scan), a worker that cannot run the batch's recognizer (handed back), any other error
(its claims released, the slot sent on after a pause). Only a crash of the process ends a run
without either: the broker redelivers its unacknowledged message, and its claims come free when
their lease runs out.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

from worker.batch import IDLE_BASE_SECONDS, IDLE_MAX_SECONDS, BatchReport, WorkerContext, take_next_batch
from worker.errors import RecognizerUnavailableError
from worker.listing_parts import LIST_SLICE_SECONDS, TRANSIENT_PAUSE_SECONDS, PartStep, list_part, s3_pages

log = logging.getLogger(__name__)

#: Seconds before a batch this worker could not serve is offered again (to any worker).
HAND_BACK_SECONDS = 30

#: Sends a window slot on: (countdown seconds, idle rounds so far).
SendSlot = Callable[[float, int], None]
#: Sends a listing part on: (part id, countdown seconds).
SendPart = Callable[[int, float], None]


def run_window_slot(
    scan_id: int,
    context: WorkerContext,
    token: str,
    send_on: SendSlot,
    idle_rounds: int = 0,
    max_idle: float = IDLE_MAX_SECONDS,
) -> BatchReport:
    """A window slot's message: the scan's next batch, then the slot sent on (or ended with its scan)."""
    try:
        step = take_next_batch(scan_id, context, token, idle_rounds, max_idle)
    except RecognizerUnavailableError as exc:
        log.warning("handing back a batch of scan %d: %s", scan_id, exc)
        context.scans.note_unserved(scan_id, str(exc))
        send_on(random.uniform(HAND_BACK_SECONDS / 2, HAND_BACK_SECONDS), 0)
        return BatchReport()
    except Exception:
        log.exception(
            "run %s of a window slot of scan %d failed; its claims are released and the slot sent on", token, scan_id
        )
        send_on(min(IDLE_BASE_SECONDS * 2**idle_rounds, max_idle), idle_rounds + 1)
        return BatchReport()
    if step.next_in is not None:
        send_on(step.next_in, step.idle_rounds)
    return step.report


def run_listing_part(
    part_id: int,
    context: WorkerContext,
    token: str,
    send_on: SendPart,
    slice_seconds: float = LIST_SLICE_SECONDS,
    s3_client=None,
) -> PartStep:
    """A listing part's message: list it for a slice, then send it on (or end it)."""
    parts = context.listing_parts
    pages = s3_pages(s3_client or context.s3_lister, attempts=context.max_attempts)
    try:
        step = list_part(part_id, parts, pages, token, slice_seconds=slice_seconds)
    except Exception:
        log.exception("run %s listing part %d failed; the part is sent on", token, part_id)
        try:
            parts.release_all(token)
        except Exception as exc:  # the database is away: the claim comes free when its lease runs out
            log.warning("could not release the parts held by run %s: %s", token, exc)
        send_on(part_id, TRANSIENT_PAUSE_SECONDS)
        return PartStep(0, TRANSIENT_PAUSE_SECONDS, part_id)
    if step.next_in is not None and step.part_id is not None:
        send_on(step.part_id, step.next_in)
    return step
