"""The batch function: a claimed batch of images in, one result row per image out.

This is the whole of a worker's job. A run (one delivery of a window slot's message, or a turn of
an embedded process) claims a batch with its own claim token and works on it while its leases are
renewed beside it (``worker/queue/leases.py``); every write it makes is fenced by that token
(``worker/queue/images.py``). The Celery task and the embedded process pool both call
:func:`take_next_batch` with a :class:`WorkerContext` built once per process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from billiard.exceptions import SoftTimeLimitExceeded
from sqlalchemy import Engine

from worker import clock
from worker.database import aware_utc, utcnow
from worker.errors import CelebscanError, TransientError
from worker.images import ImageLimits, decode_image
from worker.listing_parts import LIST_SLICE_SECONDS, list_slice, s3_pages
from worker.outcomes import ImageOutcome, KnownPicture, QueuedImage
from worker.prefilter import FacePrefilter
from worker.queue.images import ImageQueue
from worker.queue.leases import LeaseKeeping, keep_leases_in_a_thread
from worker.queue.parts import ListingParts
from worker.queue.pictures import Picture, PictureLocks
from worker.queue.scans import Scans
from worker.recognition import RecognitionResult
from worker.recognizers import PAID_BACKENDS, Recognizers
from worker.retry import call_with_retry
from worker.schema import DONE, FAILED
from worker.settings import Settings
from worker.sources import ObjectReader, S3Location, Source, build_readers
from worker.store import ResultStore

log = logging.getLogger(__name__)

#: How many runs may start an image and never end (a crash, a lost lease) before it is quarantined.
MAX_DELIVERIES = 3
#: A batch handed back for a transient cause waits this long, doubling per round, at most RESEND_MAX_SECONDS.
RESEND_BASE_SECONDS = 5.0
RESEND_MAX_SECONDS = 300.0
#: A copy of a picture another run is recognizing right now is queued again after this, to copy its result.
PICTURE_WAIT_SECONDS = 2.0


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
    lease_seconds: float = 120.0  # a claim not renewed for this long is taken over
    #: A run starts no image after this many seconds; what it did not reach goes back to the queue.
    batch_seconds: float = 300.0
    #: How a run keeps its leases while it works (a thread; the simulation has its own).
    keep_leases: LeaseKeeping = keep_leases_in_a_thread

    #: Lists S3 key-space parts (a client that leaves timestamps unparsed), built on first use.
    settings: Settings | None = None
    _s3_lister: object = field(default=None, repr=False)

    @property
    def images(self) -> ImageQueue:
        return ImageQueue(self.store.engine, self.lease_seconds)

    @property
    def listing_parts(self) -> ListingParts:
        return ListingParts(self.store.engine, self.lease_seconds)

    @property
    def pictures(self) -> PictureLocks:
        return PictureLocks(self.store.engine, self.lease_seconds)

    @property
    def scans(self) -> Scans:
        return Scans(self.store.engine)

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
            lease_seconds=settings.lease_seconds,
            batch_seconds=settings.run_seconds,
            settings=settings,
        )


@dataclass(frozen=True)
class BatchReport:
    done: int = 0
    failed: int = 0  # including images quarantined
    skipped: int = 0  # not held by this run: finished already, or taken over by another
    #: Images left ``queued`` after a transient cause outlasted the in-process retries, or waiting
    #: for a picture another run is recognizing: tried again after ``resend_after`` seconds.
    deferred: tuple[int, ...] = ()
    resend_after: float = 0.0
    refused: int = 0  # outcomes of images this run lost (its lease ran out) that were not written
    released: int = 0  # images the run did not reach before its deadline, given back

    def __add__(self, other: BatchReport) -> BatchReport:
        return BatchReport(
            done=self.done + other.done,
            failed=self.failed + other.failed,
            skipped=self.skipped + other.skipped,
            refused=self.refused + other.refused,
            released=self.released + other.released,
        )


def process_batch(image_ids: Sequence[int], context: WorkerContext, token: str | None = None) -> BatchReport:
    """Claim the given images for the run ``token`` (a new one when None: those still queued that
    no live run holds) and process them: a batch named by its ids (tests, and messages from before
    the window)."""
    token = token or f"batch:{uuid.uuid4().hex}"
    claimed = context.images.claim_ids(image_ids, token)
    report = process_claimed(claimed, context, token)
    return dataclasses.replace(report, skipped=report.skipped + len(image_ids) - len(claimed))


def process_claimed(image_ids: Sequence[int], context: WorkerContext, token: str) -> BatchReport:
    """Recognize the images the run ``token`` claimed and store the results, fenced by its claim.

    Raises :class:`RecognizerUnavailableError` before touching any image when this worker cannot
    run what the batch needs. A batch holding an image that a run started and never ended (it may
    have crashed a worker) is processed and saved one image at a time, so the culprit alone is
    quarantined and its neighbours' work is kept. The run starts no image after its deadline
    (``batch_seconds``); the images it did not reach are released for another run. On any error
    the run gives back what it holds before the error goes on.
    """
    deadline = clock.monotonic() + context.batch_seconds
    images = context.images
    try:
        with context.keep_leases(context.store.engine, token, context.lease_seconds, deadline):
            report = _process_held(image_ids, context, token, deadline)
        released = images.release(token)
    except Exception:
        _release_quietly(images, token)
        raise
    return dataclasses.replace(report, released=released)


def _process_held(image_ids: Sequence[int], context: WorkerContext, token: str, deadline: float) -> BatchReport:
    images = context.images
    held = images.held(token, image_ids)
    for backend in sorted({image.backend for image in held}):
        context.recognizers.get(backend)
    if any(image.prefilter_faces and image.backend in PAID_BACKENDS for image in held):
        context.prefilter.check_available()
    crashed_before = any(image.attempts for image in held)
    groups = [[image] for image in held] if crashed_before else [held]
    done = failed = refused = 0
    deferred: list[ImageOutcome] = []
    known = _known_by_etag(held, context)
    recognized: dict[tuple[str, int], ImageOutcome] = {}  # this batch's pictures, for copies within it
    out_of_time = False
    for group in groups:
        if out_of_time or clock.monotonic() >= deadline:
            break
        started = images.start(token, group, MAX_DELIVERIES)
        outcomes = []
        try:
            for image in started.images:
                if clock.monotonic() >= deadline:
                    break
                outcomes.append(process_image(image, context, recognized, known, token))
        except SoftTimeLimitExceeded:  # the task's time limit: write what is done, give back the rest
            log.warning("run %s reached its time limit; it writes the %d images it finished", token, len(outcomes))
            out_of_time = True
        written = images.write(token, outcomes)
        context.scans.finish_if_drained(written.scan_ids | started.scan_ids)
        ours = [o for o in outcomes if o.image_id in written.written | written.replayed]
        done += sum(o.status == DONE for o in ours)
        failed += started.quarantined + sum(o.status == FAILED for o in ours)
        deferred += [o for o in ours if o.deferred]
        refused += len(written.refused)
    now = utcnow()
    resend_after = max(((o.not_before - now).total_seconds() for o in deferred if o.not_before), default=0.0)
    return BatchReport(
        done=done,
        failed=failed,
        skipped=len(image_ids) - len(held),
        deferred=tuple(o.image_id for o in deferred),
        resend_after=resend_after,
        refused=refused,
    )


def _release_quietly(images: ImageQueue, token: str) -> None:
    try:
        images.release(token)
    except Exception as exc:  # the database is away: the claims come free when their lease runs out
        log.warning("could not release the claims of run %s: %s", token, exc)


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
    token: str = "",
) -> ImageOutcome:
    """Read, decode and recognize one image. Never raises: a failure becomes a ``failed`` outcome.

    A transient cause that outlasts the in-process retries leaves the image ``queued`` (a deferred
    outcome) until ``retry_deadline`` has passed since its first such round; then it fails with the
    transient code and how long it was tried. The MD5 of the bytes read is recorded as the image's
    ``content_hash``.

    Pay once per picture (unless the scan runs with ``--force``): an image whose bytes are those of
    a picture already recognized with the same backend (earlier, or in this batch: ``recognized``,
    by MD5 and size) copies its result instead of calling the recognizer. An S3 object's ETag is
    its MD5 for a single-part upload, so such a copy is found before the object is read. Before a
    paid call the run takes the picture (``worker/queue/pictures.py``); a copy whose picture another
    run is recognizing right now waits for that result.
    """
    started = clock.monotonic()
    outcome = _reused_or_processed(image, context, {} if recognized is None else recognized, known, token)
    return dataclasses.replace(outcome, work_ms=round(1000 * (clock.monotonic() - started)))


def _reused_or_processed(
    image: QueuedImage,
    context: WorkerContext,
    recognized: dict[tuple[str, int], ImageOutcome],
    known: dict[tuple[str, int], KnownPicture] | None,
    token: str,
) -> ImageOutcome:
    if _etag_is_md5(image):
        if known is None:
            known = context.store.known_pictures([(image.etag, image.size)], image.backend)
        picture = known.get((image.etag, image.size))
        if picture is not None:
            return ImageOutcome.copied(image, picture, image.etag)
    read: list[bytes] = []
    outcome = _process_image(image, context, read, recognized, token)
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


def _wait_or_copy(image: QueuedImage, data: bytes, context: WorkerContext, token: str) -> ImageOutcome | None:
    """Before a paid call: take the picture for this run. When another live run has it, the image
    waits for that result; when the picture was recognized since the batch looked (the other run
    wrote it just now), its result is copied. None: this run calls."""
    content_hash = _md5(data)
    if context.pictures.take(Picture(image.backend, content_hash, len(data)), token):
        known = context.store.known_picture(content_hash, len(data), image.backend)
        return ImageOutcome.copied(image, known, content_hash) if known is not None else None
    log.info("image waits for its picture: %s/%s is a copy another run is recognizing", image.bucket, image.key)
    wait = timedelta(seconds=random.uniform(PICTURE_WAIT_SECONDS, 2 * PICTURE_WAIT_SECONDS))
    return ImageOutcome.waiting(image, utcnow() + wait, content_hash)


def _process_image(
    image: QueuedImage,
    context: WorkerContext,
    read: list[bytes],
    recognized: dict[tuple[str, int], ImageOutcome],
    token: str,
) -> ImageOutcome:
    width = height = None
    kind = Source.from_url(image.source).kind
    location = S3Location(image.bucket, image.key, image.size) if kind == "s3" else None
    try:
        recognizer = context.recognizers.get(image.backend)
        data = _with_retry(context, lambda: context.readers[kind].read(image.bucket, image.key, image.etag))
        read.append(data)
        if image.reuse_results and (copy := _known_copy(image, data, context, recognized)) is not None:
            return copy
        loaded = decode_image(data, context.limits)
        width, height = loaded.width, loaded.height
        paid = recognizer.name in PAID_BACKENDS
        if paid and image.prefilter_faces and not context.prefilter.has_face(loaded.pixels):
            return ImageOutcome.done(image.id, width, height, RecognitionResult(), calls_saved=1)
        if paid and image.reuse_results and (waiting := _wait_or_copy(image, data, context, token)) is not None:
            return waiting
        result = _with_retry(context, lambda: recognizer.recognize(loaded, location))
        return ImageOutcome.done(image.id, width, height, result, paid_calls=int(paid))
    except TransientError as exc:
        return _transient_outcome(image, exc, context, width, height)
    except SoftTimeLimitExceeded:  # the run's time is up: not the image's fault
        raise
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


def _help_list(scan_id: int, context: WorkerContext, token: str) -> bool:
    """A slot with nothing to claim while its scan's S3 listing goes on lists a slice of a part
    nobody holds (or whose holder's lease ran out): so a listing whose lister died, or whose
    message was lost, still ends while any slot lives. Returns whether it listed."""
    parts = context.listing_parts
    if not parts.listed_by_workers(scan_id):  # a folder, an inventory: the scan command (or --resume) lists it
        return False
    part = parts.claim_next(scan_id, token)
    if part is None:
        return False
    pages = s3_pages(context.s3_lister, attempts=context.max_attempts)
    list_slice(part, parts, pages, deadline=clock.monotonic() + LIST_SLICE_SECONDS)
    return True


def take_next_batch(
    scan_id: int, context: WorkerContext, token: str, idle_rounds: int = 0, max_idle: float = IDLE_MAX_SECONDS
) -> SlotStep:
    """One turn of a window slot: claim the scan's next batch and process it, or say how long to wait.

    A turn that finds nothing to claim helps the scan's listing if a part of it is left to nobody,
    finishes the scan if it is drained (so a run that crashed right after the scan's last write
    leaves nothing open), then waits while more may come.
    Raises :class:`RecognizerUnavailableError` (after releasing the claim) when this worker cannot
    run what the batch needs.
    """
    image_ids = context.images.claim(scan_id, context.batch_size, token)
    if image_ids:
        return SlotStep(process_claimed(image_ids, context, token), next_in=0.0)
    state = context.images.state(scan_id)
    if state.listing and _help_list(scan_id, context, token):
        return SlotStep(BatchReport(), next_in=0.0)
    if not state.finished and not state.listing and not state.queued:  # drained, maybe: finish it
        context.scans.finish_if_drained([scan_id])
        state = context.images.state(scan_id)
    if not state.worth_waiting and state.next_due is None:
        return SlotStep(BatchReport(), next_in=None)
    wait = min(IDLE_BASE_SECONDS * 2**idle_rounds, max_idle)
    due_in = (state.next_due - utcnow()).total_seconds() if state.next_due is not None else None
    if due_in is not None and due_in > 0:  # a deferred image is due then (one due already is held by a run)
        wait = min(wait, due_in)
    return SlotStep(BatchReport(), next_in=wait, idle_rounds=idle_rounds + 1)
