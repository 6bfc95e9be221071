"""The Celery configuration shared by the producer (which only sends) and the workers.

Kept apart from :mod:`worker.celery_app` so the producer can enqueue by task name without importing
the batch function, the recognizers or the face models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker.settings import Settings

if TYPE_CHECKING:  # Celery is imported when an app is made: an embedded scan never pays for it
    from celery import Celery

TASK_NAME = "celebscan.process_batch"  # a list of image ids (messages from before the window)
#: A window slot: "take the next batch of scan N" (worker/queue/slots.py, worker/tasks.py).
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


def time_limits(settings: Settings) -> dict[str, float]:
    """Celery's soft and hard time limits of a run: a run that hangs past its deadline is interrupted
    (soft) and then killed (hard) before Redis would redeliver its message, at three quarters and
    nine tenths of the visibility timeout."""
    return {
        "soft_time_limit": max(settings.run_seconds + 1, settings.visibility_timeout * 0.75),
        "time_limit": max(settings.run_seconds + 2, settings.visibility_timeout * 0.9),
    }


def make_celery(settings: Settings) -> Celery:
    from celery import Celery
    from kombu import Queue

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
        # A batch is acknowledged only when done; a worker process that dies hands it back, and so
        # does a run killed by its hard time limit (Celery would acknowledge it, and the window
        # slot it carries would wait for its lease to run out: worker/queue/slots.py).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_timeout=False,
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
