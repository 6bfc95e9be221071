"""The Celery app workers run: ``celery -A worker.celery_app worker``.

The task is a thin wrapper over :func:`worker.batch.process_batch`. Each worker process builds its
:class:`WorkerContext` (database engine, boto3 clients, recognizer and its models) once, when the
process starts (``worker_process_init``), from the environment's settings.
"""

from __future__ import annotations

import dataclasses
import logging

from celery.signals import worker_process_init
from sqlalchemy.exc import DBAPIError, OperationalError

from worker.batch import WorkerContext, process_batch
from worker.celery_config import TASK_NAME, make_celery
from worker.settings import Settings

log = logging.getLogger(__name__)

settings = Settings.from_env()
app = make_celery(settings)
_context: WorkerContext | None = None


def worker_context() -> WorkerContext:
    """This process's context, built on first use (the solo pool sends no process-init signal)."""
    global _context
    if _context is None:
        _context = WorkerContext.from_settings(settings)
    return _context


@worker_process_init.connect
def _build_context(**_) -> None:
    worker_context()


@app.task(
    name=TASK_NAME,
    # The database being briefly unreachable is worth waiting for; the batch is re-sent with backoff.
    autoretry_for=(OperationalError, DBAPIError),
    retry_backoff=2,
    retry_backoff_max=120,
    retry_jitter=True,
    max_retries=30,
)
def process_batch_task(image_ids: list[int]) -> dict:
    report = process_batch(image_ids, worker_context())
    log.info("batch of %d: %s", len(image_ids), report)
    return dataclasses.asdict(report)
