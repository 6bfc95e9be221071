"""The Celery configuration shared by the producer (which only sends) and the workers.

Kept apart from :mod:`worker.celery_app` so the producer can enqueue by task name without importing
the batch function, the recognizers or the face models.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from worker.settings import Settings

TASK_NAME = "celebscan.process_batch"  # a list of image ids (messages from before the window)
#: A window slot: "take the next batch of scan N" (see worker/batch.py, take_next_batch).
SLOT_TASK_NAME = "celebscan.take_next_batch"
#: A part of a scan's S3 key space to list (see worker/listing_parts.py).
LIST_TASK_NAME = "celebscan.list_part"
QUEUE = "celebscan"
#: Listing has its own queue: a worker takes from both in turn, so recognition starts at once
#: while the key space is listed, and a long listing never waits behind a full window.
LISTING_QUEUE = "celebscan.listing"
#: Worker processes are replaced after this many messages, returning the face models' and Pillow's memory.
#: Many: a followed source's idle window slots are messages too (up to 16 a second), and a process
#: replaced every half minute reloads its models; the memory limit below does the real work.
MAX_TASKS_PER_CHILD = 10_000
#: ... or when their resident memory passes this many KiB (a local recognizer process peaks at ~210 MB).
MAX_MEMORY_PER_CHILD_KIB = 1_500_000


def make_celery(settings: Settings) -> Celery:
    app = Celery("celebscan", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        # JSON only: a pickled message is refused, never unpickled.
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # Results live in the database, not in Celery.
        task_ignore_result=True,
        task_default_queue=QUEUE,
        # A worker started without --queues serves both.
        task_queues=[Queue(QUEUE), Queue(LISTING_QUEUE)],
        task_routes={LIST_TASK_NAME: {"queue": LISTING_QUEUE}},
        # A batch is acknowledged only when done; a worker that dies hands it back.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
        broker_connection_retry_on_startup=True,
        worker_max_tasks_per_child=MAX_TASKS_PER_CHILD,
        worker_max_memory_per_child=MAX_MEMORY_PER_CHILD_KIB,
        # Events for Flower come from the workers; a "sent" event per message would halve the
        # producer's enqueue rate (measured: 340 vs 726 messages/s).
        worker_send_task_events=True,
        task_send_sent_event=False,
    )
    return app


def send_window_slots(
    app: Celery, scan_id: int, count: int = 1, *, countdown: float = 0.0, idle_rounds: int = 0, producer=None
) -> None:
    """Put ``count`` window slots of the scan into the broker (each a message of a few hundred bytes)."""
    for _ in range(count):
        app.send_task(
            SLOT_TASK_NAME,
            args=[scan_id],
            kwargs={"idle_rounds": idle_rounds},
            countdown=countdown or None,
            producer=producer,
            argsrepr=f"[scan {scan_id}]",
        )


def send_listing_parts(app: Celery, part_ids: list[int], *, countdown: float = 0.0, producer=None) -> None:
    """Put one message per listing part into the listing queue."""
    for part_id in part_ids:
        app.send_task(
            LIST_TASK_NAME,
            args=[part_id],
            countdown=countdown or None,
            producer=producer,
            argsrepr=f"[part {part_id}]",
        )
