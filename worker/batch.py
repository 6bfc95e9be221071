"""The batch function: a list of image ids in, one result row per image out.

This is the whole of a worker's job. The Celery task and the embedded process pool both call
:func:`process_batch` with a :class:`WorkerContext` built once per process.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import Engine

from worker.errors import BackendMismatchError, CelebscanError
from worker.images import ImageLimits, decode_image
from worker.prefilter import FacePrefilter
from worker.recognizers import PAID_BACKENDS, Recognizer, build_recognizer
from worker.results import RecognitionResult
from worker.retry import call_with_retry
from worker.schema import DONE, FAILED
from worker.settings import Settings
from worker.sources import ObjectReader, S3Location, build_readers, source_kind
from worker.store import ImageOutcome, QueuedImage, ResultStore

log = logging.getLogger(__name__)

#: How many times a batch may start on an image before it is quarantined as failed.
MAX_DELIVERIES = 3


@dataclass
class WorkerContext:
    """What a worker process talks to, built once per process and handed down."""

    store: ResultStore
    readers: dict[str, ObjectReader]  # by source kind: "folder", "s3"
    recognizer: Recognizer
    limits: ImageLimits = field(default_factory=ImageLimits)
    max_attempts: int = 5
    retry_base_seconds: float = 0.5
    prefilter: FacePrefilter = field(default_factory=FacePrefilter)

    @classmethod
    def from_settings(cls, settings: Settings, engine: Engine | None = None) -> WorkerContext:
        store = ResultStore(engine) if engine is not None else ResultStore.from_settings(settings)
        return cls(
            store=store,
            readers=build_readers(settings),
            recognizer=build_recognizer(settings, store.engine),
            limits=ImageLimits(max_pixels=settings.max_image_pixels, min_side=settings.min_image_side),
            max_attempts=settings.max_attempts,
            prefilter=FacePrefilter(settings),
        )


@dataclass(frozen=True)
class BatchReport:
    done: int = 0
    failed: int = 0  # including images quarantined
    skipped: int = 0  # no longer queued: finished by an earlier delivery of the batch


def process_batch(image_ids: Sequence[int], context: WorkerContext) -> BatchReport:
    """Recognize every still-queued image of the batch and store the results.

    A batch that was delivered before (some image already has an attempt) may hold an image that
    kills workers; it is then processed and saved one image at a time, so the culprit alone is
    quarantined and its neighbours' work is kept.
    """
    pending = context.store.pending(image_ids)
    redelivered = any(image.attempts for image in pending)
    groups = [[image] for image in pending] if redelivered else [pending]
    done = failed = 0
    for group in groups:
        started = context.store.start(group, MAX_DELIVERIES)
        outcomes = [process_image(image, context) for image in started]
        context.store.save_outcomes(outcomes)
        done += sum(outcome.status == DONE for outcome in outcomes)
        failed += len(group) - len(started) + sum(outcome.status == FAILED for outcome in outcomes)
    return BatchReport(done=done, failed=failed, skipped=len(image_ids) - len(pending))


def process_image(image: QueuedImage, context: WorkerContext) -> ImageOutcome:
    """Read, decode and recognize one image. Never raises: a failure becomes a ``failed`` outcome."""
    width = height = None
    kind = source_kind(image.source)
    location = S3Location(image.bucket, image.key, image.size) if kind == "s3" else None
    try:
        if image.backend and image.backend != context.recognizer.name:
            raise BackendMismatchError(
                f"the scan asked for the {image.backend} recognizer but this worker runs {context.recognizer.name}: "
                f"start workers with CELEBSCAN_BACKEND={image.backend}, then run the scan again"
            )
        data = _with_retry(context, lambda: context.readers[kind].read(image.bucket, image.key))
        loaded = decode_image(data, context.limits)
        width, height = loaded.width, loaded.height
        paid = context.recognizer.name in PAID_BACKENDS
        if paid and image.prefilter_faces and not context.prefilter.has_face(loaded.pixels):
            return ImageOutcome.done(image.id, width, height, RecognitionResult(), calls_saved=1)
        result = _with_retry(context, lambda: context.recognizer.recognize(loaded, location))
        return ImageOutcome.done(image.id, width, height, result, paid_calls=int(paid))
    except CelebscanError as exc:
        log.info("image failed: %s/%s: %s: %s", image.bucket, image.key, exc.code, exc)
        return ImageOutcome.failed(image.id, exc.code, str(exc), width, height)
    except Exception as exc:  # the task boundary: an unexpected error must not lose the image
        log.exception("unexpected error on %s/%s", image.bucket, image.key)
        return ImageOutcome.failed(image.id, "InternalError", f"{type(exc).__name__}: {exc}", width, height)


def _with_retry(context: WorkerContext, call):
    return call_with_retry(call, attempts=context.max_attempts, base=context.retry_base_seconds)
