"""The batch function: a list of image ids in, one result row per image out.

This is the whole of a worker's job. The Celery task and the embedded process pool both call
:func:`process_batch` with a :class:`WorkerContext` built once per process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import Engine

from worker.claims import ClaimQueue
from worker.database import aware_utc, utcnow
from worker.errors import CelebscanError, RecognizerUnavailableError, TransientError
from worker.images import ImageLimits, decode_image
from worker.listing_parts import ListingParts
from worker.outcomes import ImageOutcome, KnownPicture, QueuedImage
from worker.prefilter import FacePrefilter
from worker.recognizers import PAID_BACKENDS, Recognizers
from worker.results import RecognitionResult
from worker.retry import call_with_retry
from worker.schema import DONE, FAILED
from worker.settings import Settings
from worker.sources import ObjectReader, S3Location, Source, build_readers
from worker.store import ResultStore

log = logging.getLogger(__name__)

#: How many times a batch may start on an image before it is quarantined as failed.
MAX_DELIVERIES = 3
#: A batch handed back for a transient cause waits this long, doubling per round, at most RESEND_MAX_SECONDS.
RESEND_BASE_SECONDS = 5.0
RESEND_MAX_SECONDS = 300.0


@dataclass
class WorkerContext:
    """What a worker process talks to, built once per process and handed down."""

    store: ResultStore
    readers: dict[str, ObjectReader]  # by source kind: "folder", "s3"
    recognizers: Recognizers
    limits: ImageLimits = field(default_factory=ImageLimits)
    max_attempts: int = 5
    retry_base_seconds: float = 0.5
    #: Seconds from an image's first transient failure until it is failed for good.
    retry_deadline: float = 3600.0
    prefilter: FacePrefilter = field(default_factory=FacePrefilter)
    batch_size: int = 16  # images a window slot claims when its scan names no batch size
    lease_seconds: float = 3600.0  # a claim whose message was lost is taken over after this

    #: Lists S3 key-space parts (a client that leaves timestamps unparsed), built on first use.
    settings: Settings | None = None
    _s3_lister: object = field(default=None, repr=False)

    @property
    def claims(self) -> ClaimQueue:
        return ClaimQueue(self.store.engine, self.lease_seconds)

    @property
    def listing_parts(self) -> ListingParts:
        return ListingParts(self.store, self.lease_seconds)

    @property
    def s3_lister(self):
        if self._s3_lister is None:
            from worker.aws import client

            self._s3_lister = client("s3", self.settings or Settings(), raw_timestamps=True)
        return self._s3_lister

    @classmethod
    def from_settings(cls, settings: Settings, engine: Engine | None = None) -> WorkerContext:
        store = ResultStore(engine) if engine is not None else ResultStore.from_settings(settings)
        return cls(
            store=store,
            readers=build_readers(settings),
            recognizers=Recognizers(settings, store.engine),
            limits=ImageLimits(max_pixels=settings.max_image_pixels, min_side=settings.min_image_side),
            max_attempts=settings.max_attempts,
            retry_deadline=settings.retry_deadline,
            prefilter=FacePrefilter(settings),
            batch_size=settings.batch_size,
            lease_seconds=settings.visibility_timeout,
            settings=settings,
        )


@dataclass(frozen=True)
class BatchReport:
    done: int = 0
    failed: int = 0  # including images quarantined
    skipped: int = 0  # no longer queued: finished by an earlier delivery of the batch
    #: Images left ``queued`` after a transient cause outlasted the in-process retries: send them
    #: again after ``resend_after`` seconds.
    deferred: tuple[int, ...] = ()
    resend_after: float = 0.0


def process_batch(image_ids: Sequence[int], context: WorkerContext, delivery: str = "") -> BatchReport:
    """Recognize every still-queued image of the batch and store the results.

    Raises :class:`RecognizerUnavailableError` before touching any image when this worker cannot
    run what the batch needs. ``delivery`` names the message (see ``ResultStore.start``). A message
    delivered again after a run that never ended may hold an image that kills workers; it is then
    processed and saved one image at a time, so the culprit alone is quarantined and its
    neighbours' work is kept.
    """
    pending = context.store.pending(image_ids)
    for backend in sorted({image.backend for image in pending}):
        context.recognizers.get(backend)
    if any(image.prefilter_faces and image.backend in PAID_BACKENDS for image in pending):
        context.prefilter.check_available()
    redelivered = any(image.attempts and image.started_by == delivery for image in pending)
    groups = [[image] for image in pending] if redelivered else [pending]
    done = failed = 0
    deferred: list[ImageOutcome] = []
    known = _known_by_etag(pending, context)
    recognized: dict[tuple[str, int], ImageOutcome] = {}  # this batch's pictures, for copies within it
    for group in groups:
        started = context.store.start(group, MAX_DELIVERIES, delivery)
        outcomes = [process_image(image, context, recognized, known) for image in started]
        context.store.save_outcomes(outcomes)
        done += sum(outcome.status == DONE for outcome in outcomes)
        failed += len(group) - len(started) + sum(outcome.status == FAILED for outcome in outcomes)
        deferred += [outcome for outcome in outcomes if outcome.deferred]
    now = utcnow()
    resend_after = max(((o.not_before - now).total_seconds() for o in deferred if o.not_before), default=0.0)
    return BatchReport(
        done=done,
        failed=failed,
        skipped=len(image_ids) - len(pending),
        deferred=tuple(outcome.image_id for outcome in deferred),
        resend_after=resend_after,
    )


def _known_by_etag(batch: Sequence[QueuedImage], context: WorkerContext) -> dict[tuple[str, int], KnownPicture] | None:
    """Pictures already recognized among the batch's S3 objects whose ETag is their MD5, found in
    one query for the batch (None when the batch has no such object to look up)."""
    by_backend: dict[str, list[tuple[str, int]]] = {}
    for image in batch:
        if _etag_is_md5(image):
            by_backend.setdefault(image.backend, []).append((image.etag, image.size))
    if not by_backend:
        return None
    known: dict[tuple[str, int], KnownPicture] = {}
    for backend, pictures in by_backend.items():
        known.update(context.store.known_pictures(pictures, backend))
    return known


def process_image(
    image: QueuedImage,
    context: WorkerContext,
    recognized: dict[tuple[str, int], ImageOutcome] | None = None,
    known: dict[tuple[str, int], KnownPicture] | None = None,
) -> ImageOutcome:
    """Read, decode and recognize one image. Never raises: a failure becomes a ``failed`` outcome.

    A transient cause that outlasts the in-process retries leaves the image ``queued`` (a deferred
    outcome) until ``retry_deadline`` has passed since its first such round; then it fails with the
    transient code and how long it was tried. The MD5 of the bytes read is recorded as the image's
    ``content_hash``.

    Pay once per picture (unless the scan runs with ``--force``): an image whose bytes are those of
    a picture already recognized with the same backend (earlier, or in this batch: ``recognized``,
    by MD5 and size) copies its result instead of calling the recognizer. An S3 object's ETag is
    its MD5 for a single-part upload, so such a copy is found before the object is read.
    """
    started = time.perf_counter()
    outcome = _reused_or_processed(image, context, {} if recognized is None else recognized, known)
    return dataclasses.replace(outcome, work_ms=round(1000 * (time.perf_counter() - started)))


def _reused_or_processed(
    image: QueuedImage,
    context: WorkerContext,
    recognized: dict[tuple[str, int], ImageOutcome],
    known: dict[tuple[str, int], KnownPicture] | None,
) -> ImageOutcome:
    if _etag_is_md5(image):
        if known is None:
            known = context.store.known_pictures([(image.etag, image.size)], image.backend)
        picture = known.get((image.etag, image.size))
        if picture is not None:
            return ImageOutcome.copied(image, picture, image.etag)
    read: list[bytes] = []
    outcome = _process_image(image, context, read, recognized)
    if not read:
        return outcome
    if outcome.content_hash is None:
        outcome = dataclasses.replace(outcome, content_hash=_md5(read[0]))
    if outcome.status == DONE and outcome.copied_from is None:
        recognized.setdefault((outcome.content_hash or "", len(read[0])), outcome)
    return outcome


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _etag_is_md5(image: QueuedImage) -> bool:
    """An S3 object whose ETag is the MD5 of its bytes (a single-part upload; a multipart one ends
    in ``-N``), in a scan that reuses known results."""
    etag = image.etag
    return (
        image.reuse_results
        and Source.from_url(image.source).is_s3
        and len(etag) == 32
        and all(c in "0123456789abcdef" for c in etag)
    )


def _known_copy(
    image: QueuedImage, data: bytes, context: WorkerContext, recognized: dict[tuple[str, int], ImageOutcome]
) -> ImageOutcome | None:
    """The outcome of a picture already recognized whose bytes are ``data``, copied; or None."""
    content_hash = _md5(data)
    earlier = recognized.get((content_hash, len(data)))
    if earlier is not None:
        picture = KnownPicture(earlier.image_id, earlier.width, earlier.height)
        return ImageOutcome.copied(image, picture, content_hash, earlier.result)
    if content_hash == image.etag and _etag_is_md5(image):
        return None  # looked up by its ETag already
    known = context.store.known_picture(content_hash, len(data), image.backend)
    return ImageOutcome.copied(image, known, content_hash) if known is not None else None


def _process_image(
    image: QueuedImage, context: WorkerContext, read: list[bytes], recognized: dict[tuple[str, int], ImageOutcome]
) -> ImageOutcome:
    width = height = None
    kind = Source.from_url(image.source).kind
    location = S3Location(image.bucket, image.key, image.size) if kind == "s3" else None
    try:
        recognizer = context.recognizers.get(image.backend)
        data = _with_retry(context, lambda: context.readers[kind].read(image.bucket, image.key))
        read.append(data)
        if image.reuse_results and (copy := _known_copy(image, data, context, recognized)) is not None:
            return copy
        loaded = decode_image(data, context.limits)
        width, height = loaded.width, loaded.height
        paid = recognizer.name in PAID_BACKENDS
        if paid and image.prefilter_faces and not context.prefilter.has_face(loaded.pixels):
            return ImageOutcome.done(image.id, width, height, RecognitionResult(), calls_saved=image.calls_saved + 1)
        result = _with_retry(context, lambda: recognizer.recognize(loaded, location))
        return ImageOutcome.done(image.id, width, height, result, paid_calls=image.paid_calls + int(paid))
    except TransientError as exc:
        return _transient_outcome(image, exc, context, width, height)
    except CelebscanError as exc:
        log.info("image failed: %s/%s: %s: %s", image.bucket, image.key, exc.code, exc)
        return ImageOutcome.failed(image.id, exc.code, str(exc), width, height)
    except Exception as exc:  # the task boundary: an unexpected error must not lose the image
        log.exception("unexpected error on %s/%s", image.bucket, image.key)
        return ImageOutcome.failed(image.id, "InternalError", f"{type(exc).__name__}: {exc}", width, height)


def _transient_outcome(
    image: QueuedImage, exc: TransientError, context: WorkerContext, width: int | None, height: int | None
) -> ImageOutcome:
    now = utcnow()
    since = image.retry_since or now
    tries = image.retries + context.max_attempts
    waited = (now - aware_utc(since)).total_seconds()
    if waited >= context.retry_deadline:
        message = f"gave up after {tries} tries over {_duration(waited)}: {exc}"
        log.warning("image failed: %s/%s: %s: %s", image.bucket, image.key, exc.code, message)
        return ImageOutcome.failed(image.id, exc.code, message, width, height)
    log.info("image deferred: %s/%s: %s (%d tries so far)", image.bucket, image.key, exc, tries)
    rounds = tries // max(1, context.max_attempts)
    delay = _resend_delay(rounds, context)
    return ImageOutcome.deferred_for(
        image,
        exc.code,
        str(exc),
        retries=tries,
        retry_since=since,
        not_before=now + timedelta(seconds=delay),
    )


def _resend_delay(rounds: int, context: WorkerContext) -> float:
    """Growing with the rounds an image was deferred (full jitter), and short against the deadline."""
    ceiling = min(RESEND_BASE_SECONDS * 2 ** max(0, rounds - 1), RESEND_MAX_SECONDS, context.retry_deadline / 4)
    return max(0.5, random.uniform(ceiling / 2, ceiling))


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def _with_retry(context: WorkerContext, call):
    return call_with_retry(call, attempts=context.max_attempts, base=context.retry_base_seconds)


#: A window slot that finds nothing to claim waits this long, doubling while it finds nothing.
IDLE_BASE_SECONDS = 0.5
IDLE_MAX_SECONDS = 30.0


@dataclass(frozen=True)
class SlotStep:
    """What one turn of a window slot did, and when the slot should come back (None: it ends)."""

    report: BatchReport
    next_in: float | None
    idle_rounds: int = 0


def take_next_batch(
    scan_id: int, context: WorkerContext, token: str, idle_rounds: int = 0, max_idle: float = IDLE_MAX_SECONDS
) -> SlotStep:
    """One turn of a window slot: claim the scan's next batch and process it, or say how long to wait.

    Raises :class:`RecognizerUnavailableError` (after releasing the claim) when this worker cannot
    run what the batch needs.
    """
    claims = context.claims
    image_ids = claims.claim(scan_id, context.batch_size, token)
    if image_ids:
        try:
            return SlotStep(process_batch(image_ids, context, delivery=token), next_in=0.0)
        except RecognizerUnavailableError:
            claims.release(token)
            raise
    state = claims.state(scan_id)
    if not state.worth_waiting and state.next_due is None:
        return SlotStep(BatchReport(), next_in=None)
    wait = min(IDLE_BASE_SECONDS * 2**idle_rounds, max_idle)
    if state.next_due is not None:
        wait = min(wait, max(0.0, (state.next_due - utcnow()).total_seconds()))
    return SlotStep(BatchReport(), next_in=wait, idle_rounds=idle_rounds + 1)
