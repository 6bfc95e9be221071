"""What a message does, whatever delivers it: Celery, or the seeded simulation of faults.

Every way a run can end sends its message on or gives back what it holds, so neither the window
nor a listing ever shrinks: a batch done (the slot is sent on), nothing to claim yet or a worker
that cannot run the batch's recognizer (the slot is parked until its next turn), any other error
(its claims released, the slot parked for a pause), the scan finished (the slot ends). Only a
crash of the process ends a run without either: its claims come free when their lease runs out,
and its slot comes back with its message's next delivery or, once its lease ran out, from the
window's keeper (``worker/keeper.py``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence

from billiard.exceptions import SoftTimeLimitExceeded

from worker.batch import IDLE_BASE_SECONDS, IDLE_MAX_SECONDS, BatchReport, SlotStep, WorkerContext, take_next_batch
from worker.errors import RecognizerUnavailableError
from worker.listing_parts import LIST_SLICE_SECONDS, TRANSIENT_PAUSE_SECONDS, PartStep, list_part, s3_pages
from worker.queue.slots import SlotMessage, WindowSlots
from worker.retry import doubling

log = logging.getLogger(__name__)

#: Seconds before a batch this worker could not serve is offered again (to any worker).
HAND_BACK_SECONDS = 30

#: Puts window slots' messages into the broker; returns those it could not take.
SendSlots = Callable[[Sequence[SlotMessage]], list[SlotMessage]]
#: Sends a listing part on: (part id, countdown seconds).
SendPart = Callable[[int, float], None]


def run_window_slot(
    message: SlotMessage,
    context: WorkerContext,
    token: str,
    send: SendSlots,
    max_idle: float = IDLE_MAX_SECONDS,
) -> BatchReport:
    """A window slot's message: take the slot (a stale message does nothing), the scan's next
    batch, then the slot sent on at once, parked until its next turn, or ended with its scan.

    A run that fails gives its claims back and parks the slot for a pause; one that cannot run the
    scan's recognizer parks it for any worker to take later. A run killed before it could do either
    leaves the slot to its message's next delivery (a hard time limit requeues it), or to the
    window's keeper once its lease ran out (``worker/keeper.py``).
    """
    slots = context.slots
    taken = slots.take(message, token)
    if taken is None:
        log.info("message %s is no longer its slot's: it does nothing", message.message_id)
        return BatchReport()
    idle_rounds = taken.idle_rounds
    try:
        step = take_next_batch(message.scan_id, context, token, idle_rounds, max_idle)
    except RecognizerUnavailableError as exc:
        log.warning("handing back a batch of scan %d: %s", message.scan_id, exc)
        context.scans.note_unserved(message.scan_id, str(exc))
        pause = random.uniform(HAND_BACK_SECONDS / 2, HAND_BACK_SECONDS)
        _whatever_the_time_limit(lambda: slots.park(message, token, pause, 0))
        return BatchReport()
    except Exception:
        log.exception(
            "run %s of a window slot of scan %d failed; its claims are released and the slot goes on after a pause",
            token,
            message.scan_id,
        )
        pause = doubling(IDLE_BASE_SECONDS, idle_rounds, max_idle)
        _whatever_the_time_limit(lambda: slots.park(message, token, pause, idle_rounds + 1))
        return BatchReport()
    _whatever_the_time_limit(lambda: _pass_the_slot_on(message, token, step, slots, send))
    return step.report


def _pass_the_slot_on(message: SlotMessage, token: str, step: SlotStep, slots: WindowSlots, send: SendSlots) -> None:
    """The slot ends with its scan, waits for its next turn, or goes on at once."""
    if step.next_in is None:
        slots.end(message, token)
    elif step.next_in > 0:
        slots.park(message, token, step.next_in, step.idle_rounds)
    elif (next_message := slots.send_on(message, token)) is not None:
        slots.unsend(send([next_message]))


def _whatever_the_time_limit(transition: Callable[[], object]) -> None:
    """A slot's last transition in a run, made even when the soft time limit lands in the middle of
    it (Celery raises it once; the transaction it cut was rolled back)."""
    try:
        transition()
    except SoftTimeLimitExceeded:
        transition()


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
