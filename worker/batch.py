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
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial

from billiard.exceptions import SoftTimeLimitExceeded
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from worker import clock, threads
from worker.database import aware_utc, utcnow
from worker.errors import CelebscanError, ServiceUnavailableError, TransientError
from worker.faces.prefilter import FacePrefilter
from worker.inflight import LaneInterrupted, Lanes, RunPictures, lanes_for
from worker.listing_parts import LIST_SLICE_SECONDS, list_slice, s3_pages
from worker.media.images import ImageLimits, decode_image
from worker.media.video import VIDEO
from worker.outcomes import ImageOutcome, KnownPicture, QueuedImage
from worker.queue.images import ClaimState, ImageQueue
from worker.queue.leases import LeaseKeeping, keep_leases_in_a_thread
from worker.queue.parts import ListingParts
from worker.queue.pictures import Picture, PictureLocks
from worker.queue.scans import Scans
from worker.queue.slots import WindowSlots
from worker.recognition import RecognitionResult
from worker.recognizers import PAID_BACKENDS, Recognizers
from worker.retry import call_with_retry, doubling
from worker.schema import DONE, FAILED
from worker.settings import Settings
from worker.sources import ObjectReader, S3Location, Source, build_readers
from worker.store import ResultStore
from worker.videos.completions import CompletionReader
from worker.videos.step import process_video

log = logging.getLogger(__name__)

#: How many runs may start an image and never end (a crash, a lost lease) before it is quarantined.
MAX_DELIVERIES = 3
#: A batch handed back for a transient cause waits this long, doubling per round, at most RESEND_MAX_SECONDS.
RESEND_BASE_SECONDS = 5.0
RESEND_MAX_SECONDS = 300.0
#: A copy of a picture another run is recognizing right now is queued again after this, to copy its result.
PICTURE_WAIT_SECONDS = 2.0
#: A copy waits this long for another image of its own run to be recognized before it is queued again.
PICTURE_PATIENCE_SECONDS = 30.0
#: A run looks at the calls that came back (and claims more) at least this often.
WAIT_SECONDS = 0.5
#: A run that has calls in flight claims more of its scan for up to this long (from half of it: the
#: runs of a machine's processes, started together, do not all end together), then ends and sends its
#: slot on: the few seconds its last calls take are the only time its process has fewer in flight.
REFILL_SECONDS = 60.0
#: The slice of the listing a run's helper thread lists at a time, and its pause when nothing is left to it.
HELP_SLICE_SECONDS = 5.0
HELP_IDLE_SECONDS = 2.0
#: How long a run waits for its listing helper past its slice before it ends without it.
HELP_JOIN_GRACE_SECONDS = 10.0


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
    #: Processes draining a scan together, which split its last batches (an embedded pool's).
    claim_sharers: int = 1
    lease_seconds: float = 120.0  # a claim not renewed for this long is taken over
    #: A run starts no image after this many seconds; what it did not reach goes back to the queue.
    batch_seconds: float = 300.0
    #: How a run keeps its leases while it works (a thread; the simulation has its own).
    keep_leases: LeaseKeeping = keep_leases_in_a_thread
    #: Images a run keeps in flight with a paid recognizer (the local one works one at a time).
    calls_in_flight: int = 1
    #: Where a run works its images, given how many at once (threads; the simulation: inline).
    lanes: Callable[[int], Lanes] = lanes_for
    #: How long a run with calls in flight goes on claiming its scan's next batches.
    refill_seconds: float = REFILL_SECONDS
    #: Whether a run working one image at a time also claims next batches (the simulation does).
    refill_inline: bool = False

    #: Reads Rekognition Video's completion messages, when they are set up (worker/videos/completions.py).
    video_completions: CompletionReader = field(default_factory=CompletionReader)

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
    def slots(self) -> WindowSlots:
        return WindowSlots(self.store.engine, self.lease_seconds)

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
            calls_in_flight=settings.calls_in_flight,
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
    have crashed a worker) is processed and saved one image at a time, alone, so the culprit alone
    is quarantined and its neighbours' work is kept. The run starts no image after its deadline
    (``batch_seconds``); the images it did not reach are released for another run. On any error
    the run gives back what it holds before the error goes on.
    """
    return _Run(context, token).work(image_ids)


def run_of(token: str) -> str:
    """The run a batch's token belongs to (a run's later batches are ``<run token>/<n>``)."""
    return token.split("/", 1)[0]


@dataclass(eq=False)
class _Chunk:
    """Images claimed together under one token: started together, written in one transaction."""

    token: str
    left: int  # images submitted and not yet back
    outcomes: dict[int, ImageOutcome] = field(default_factory=dict)  # by image id
    scan_ids: frozenset[int] = frozenset()


class _Run:
    """One run: its first batch and, while its scan has more and time is left, further batches
    claimed as calls come back (each under a token of its own, ``<run token>/<n>``), so that
    ``CELEBSCAN_CALLS_IN_FLIGHT`` calls stay in flight; a batch is written as soon as its last image
    is back. While calls wait, a thread of the run helps list the scan's source."""

    def __init__(self, context: WorkerContext, token: str, scan_id: int | None = None) -> None:
        self.context, self.token, self.scan_id = context, token, scan_id
        self.tokens = [token]  # every token of the run: the lease keeper renews them all
        now = clock.monotonic()
        self.deadline = now + context.batch_seconds
        # After its deadline a run starts nothing, but waits for its calls out and writes them: its
        # leases are kept for as long again (a loaded machine's slow calls must not cost the claims
        # and count as interruptions); one that hangs longer loses them like a crashed run.
        self.renew_until = self.deadline + context.batch_seconds
        self.refill_until = now + context.refill_seconds * random.uniform(0.5, 1.0)
        self.pictures: RunPictures[tuple[str, int], ImageOutcome] = RunPictures()
        self.in_flight: dict[Future, _Chunk] = {}
        self.unwritten: list[_Chunk] = []  # batches started and not yet written
        self.stopped = False  # the deadline or the time limit: no image starts any more
        self.refilling = scan_id is not None
        self.claim_size = 1  # the most a claim gave: the scan's batch size
        self.totals = dict(done=0, failed=0, refused=0, skipped=0)
        self.deferred: list[ImageOutcome] = []

    def live_tokens(self) -> tuple[str, ...]:
        return tuple(self.tokens)

    def work(self, first_ids: Sequence[int]) -> BatchReport:
        images = self.context.images
        try:
            with self.context.keep_leases(
                self.context.store.engine, self.live_tokens, self.context.lease_seconds, self.renew_until
            ):
                self._work(first_ids)
            released = images.release(*self.tokens)
        except (Exception, KeyboardInterrupt):  # Ctrl-C, or an embedded scan's SIGTERM: the images are free at once
            _release_quietly(images, *self.tokens)
            raise
        now = utcnow()
        resend_after = max(((o.not_before - now).total_seconds() for o in self.deferred if o.not_before), default=0.0)
        return BatchReport(
            **self.totals,
            deferred=tuple(o.image_id for o in self.deferred),
            resend_after=resend_after,
            released=released,
        )

    def _work(self, first_ids: Sequence[int]) -> None:
        held = self.context.images.held(self.token, first_ids)
        self.totals["skipped"] = len(first_ids) - len(held)
        for backend in sorted({image.backend for image in held}):
            self.context.recognizers.get(backend)
        if any(image.prefilter_faces and image.backend in PAID_BACKENDS for image in held):
            self.context.prefilter.check_available()
        paid = bool(held) and all(image.backend in PAID_BACKENDS for image in held)
        lanes = self.context.lanes(self.context.calls_in_flight if paid else 1)
        self.refilling = self.refilling and (lanes.size > 1 or self.context.refill_inline)
        helper = _ListingHelper(self) if lanes.size > 1 and self.scan_id is not None else None
        try:
            self._start(self.token, held, lanes)
            self._pipeline(lanes)
        except SoftTimeLimitExceeded:  # the task's time limit: write what is back, give back the rest
            log.warning("run %s reached its time limit; it writes the images it finished", self.token)
            self._stop()
            # Slowness is not the images' fault: should the hard limit kill the run while it waits
            # for its calls, they are not counted toward quarantine.
            _quietly(self.context.images.discount_starts, *self.tokens)
            self._salvage(lanes)
        except Exception:  # the calls already paid for are written before the error goes on
            log.warning("run %s failed; it writes the images it finished", self.token)
            try:
                self._salvage(lanes)
            except Exception:
                log.exception("run %s could not write what it finished", self.token)
            raise
        finally:
            lanes.close()
            if helper is not None:
                helper.stop()

    def _salvage(self, lanes: Lanes) -> None:
        """Start nothing more, wait for the calls out, write every batch with outcomes."""
        self._stop()
        self._collect(lanes, patience=None)
        for chunk in list(self.unwritten):  # cut short between taking an outcome and its batch's write
            if chunk.outcomes:
                self._write(chunk)

    def _pipeline(self, lanes: Lanes) -> None:
        while True:
            if not self.stopped and clock.monotonic() >= self.deadline:
                self._stop()
            if self.refilling and not self.stopped and self._room(lanes):
                self._refill(lanes)
            if not self.in_flight:
                return
            self._collect(lanes, patience=WAIT_SECONDS)

    def _room(self, lanes: Lanes) -> bool:
        if clock.monotonic() >= self.refill_until:
            self.refilling = False
            return False
        # A lane free, and what is started and not yet written (a slow call keeps its batch open)
        # within the lanes and a batch: all a crash could make the run pay for again.
        unwritten = sum(chunk.left + len(chunk.outcomes) for chunk in self.unwritten)
        return len(self.in_flight) < lanes.size and unwritten < lanes.size + self.claim_size

    def _refill(self, lanes: Lanes) -> None:
        assert self.scan_id is not None
        token = f"{run_of(self.token)}/{len(self.tokens)}"
        self.tokens.append(token)
        image_ids = self.context.images.claim(self.scan_id, self.context.batch_size, token)
        if not image_ids:
            self.refilling = False
            return
        self._start(token, self.context.images.held(token, image_ids), lanes)

    def _start(self, token: str, held: Sequence[QueuedImage], lanes: Lanes) -> None:
        known = _known_by_etag(held, self.context)
        if any(image.attempts for image in held):
            self._drain(lanes)
            for image in held:
                self._isolated(token, image, known)
            return
        self.claim_size = max(self.claim_size, len(held))
        started = self.context.images.start(token, held, MAX_DELIVERIES)
        self.totals["failed"] += started.quarantined
        chunk = _Chunk(token, len(started.images), scan_ids=started.scan_ids)
        self.unwritten.append(chunk)
        for image in started.images:
            future = lanes.submit(partial(process_image, image, self.context, self.pictures, known, token))
            self.in_flight[future] = chunk
        if not started.images:
            self._write(chunk)

    def _isolated(self, token: str, image: QueuedImage, known) -> None:
        """An image that a run started and never ended: worked alone, written at once."""
        if self.stopped or clock.monotonic() >= self.deadline:
            return
        started = self.context.images.start(token, [image], MAX_DELIVERIES)
        self.totals["failed"] += started.quarantined
        chunk = _Chunk(token, 0, scan_ids=started.scan_ids)
        self.unwritten.append(chunk)  # cut short by the time limit, it is written with what is back
        for each in started.images:
            chunk.outcomes[each.id] = process_image(each, self.context, self.pictures, known, token)
        self._write(chunk)

    def _drain(self, lanes: Lanes) -> None:
        while self.in_flight:
            self._collect(lanes, patience=WAIT_SECONDS)

    def _stop(self) -> None:
        self.stopped = True
        self.refilling = False
        for future in self.in_flight:
            future.cancel()  # not started yet: given back with the run's release

    def _collect(self, lanes: Lanes, patience: float | None) -> None:
        """Take what came back (waiting up to ``patience`` seconds; None: until all is back) and
        write each batch whose last image is back."""
        while True:
            back = lanes.wait_any(self.in_flight, timeout=WAIT_SECONDS if patience is None else patience)
            for future in back:  # the outcome is kept before the future is let go: the time limit may strike
                chunk = self.in_flight[future]
                error = None if future.cancelled() else future.exception()
                if isinstance(error, SoftTimeLimitExceeded):  # an image worked inline, cut short
                    self._stop()
                elif error is None and not future.cancelled():
                    outcome = future.result()
                    chunk.outcomes[outcome.image_id] = outcome
                del self.in_flight[future]
                chunk.left -= 1
                # LaneInterrupted: its work was cut short, the image goes back. Anything else is a
                # bug: the run writes what came back (its other futures) and fails.
                if error is not None and not isinstance(error, (SoftTimeLimitExceeded, LaneInterrupted)):
                    raise error
            for chunk in [each for each in self.unwritten if each.left == 0]:
                self._write(chunk)
            if patience is not None or not self.in_flight:
                return

    def _write(self, chunk: _Chunk) -> None:
        context = self.context
        outcomes = list(chunk.outcomes.values())
        written = context.images.write(chunk.token, outcomes)
        self.unwritten.remove(chunk)
        context.scans.finish_if_drained(written.scan_ids | chunk.scan_ids)
        ours = [o for o in outcomes if o.image_id in written.written | written.replayed]
        self.totals["done"] += sum(o.status == DONE for o in ours)
        self.totals["failed"] += sum(o.status == FAILED for o in ours)
        self.totals["refused"] += len(written.refused)
        self.deferred += [o for o in ours if o.deferred]


class _ListingHelper:
    """A thread of a run whose calls wait on the network: it lists the scan's source meanwhile,
    a short slice of a part nobody holds at a time, so slow calls never hold the listing up."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self._stopping = threads.event()
        self._thread = threads.start(self._list, name=f"lister-{run.token}")

    def _list(self) -> None:
        run = self.run
        assert run.scan_id is not None
        try:
            while not self._stopping.is_set() and _helpable(run.context.images.state(run.scan_id)):
                if not _help_list(run.scan_id, run.context, run.token, slice_seconds=HELP_SLICE_SECONDS):
                    self._stopping.wait(HELP_IDLE_SECONDS)
        except Exception:  # the run goes on without help
            log.exception("run %s stopped helping the listing", run.token)
            try:
                run.context.listing_parts.release_all(run.token)
            except Exception as exc:  # the database is away: the part comes free when its lease runs out
                log.warning("could not release the part run %s was listing: %s", run.token, exc)

    def stop(self) -> None:
        """Ends the helper after its slice; one that hangs (a page retried for minutes) is left to
        end by itself: its part is fenced by the run's token, which nobody renews after the run."""
        self._stopping.set()
        self._thread.join(HELP_SLICE_SECONDS + HELP_JOIN_GRACE_SECONDS)


def _release_quietly(images: ImageQueue, *tokens: str) -> None:
    _quietly(images.release, *tokens)


def _quietly(give_back: Callable[..., object], *tokens: str) -> None:
    """Give back what the run's ``tokens`` hold, or leave it to their leases when the database is away."""
    try:
        give_back(*tokens)
    except Exception as exc:  # the database is away: the claims come free when their lease runs out
        log.warning("run %s could not %s: %s", tokens[0], give_back.__name__, exc)


def _known_by_etag(batch: Sequence[QueuedImage], context: WorkerContext) -> dict[tuple[str, int], KnownPicture] | None:
    """Pictures already recognized among the batch's S3 objects whose ETag is their MD5, found in
    one query for the batch (None when the batch has no such object to look up)."""
    by_scope: dict[tuple[str, int, bool], list[tuple[str, int]]] = {}
    for image in batch:
        if _etag_is_md5(image):
            scope = (image.backend, image.scan_id, not image.reuse_results)
            by_scope.setdefault(scope, []).append((image.etag, image.size))
    if not by_scope:
        return None
    known: dict[tuple[str, int], KnownPicture] = {}
    for (backend, scan_id, forced), pictures in by_scope.items():
        known.update(context.store.known_pictures(pictures, backend, scan_id, forced))
    return known


def _known(context: WorkerContext, image: QueuedImage, content_hash: str, size: int) -> KnownPicture | None:
    """A picture already recognized whose bytes are these, as the image's scan may reuse it: any
    scan's result, or only its own scan's when it runs with ``--force`` (each picture recognized
    afresh once, its copies reusing that)."""
    return context.store.known_picture(content_hash, size, image.backend, image.scan_id, not image.reuse_results)


def process_image(
    image: QueuedImage,
    context: WorkerContext,
    pictures: RunPictures[tuple[str, int], ImageOutcome] | None = None,
    known: dict[tuple[str, int], KnownPicture] | None = None,
    token: str = "",
) -> ImageOutcome:
    """Read, decode and recognize one image. Never raises: a failure becomes a ``failed`` outcome.

    A transient cause that outlasts the in-process retries leaves the image ``queued`` (a deferred
    outcome) until ``retry_deadline`` has passed since its first such round; then it fails with the
    transient code and how long it was tried. The MD5 of the bytes read is recorded as the image's
    ``content_hash``.

    Pay once per picture: an image whose bytes are those of a picture already recognized with the
    same backend (earlier, or in this run: ``pictures``, by MD5 and size) copies its result instead
    of calling the recognizer; in a scan run with ``--force``, only a result of that scan is copied
    (each picture is recognized afresh once). An S3 object's ETag is its
    MD5 for a single-part upload, so such a copy is found before the object is read. A copy whose
    picture another image of the run is being recognized for waits for that result; before a paid
    call the run takes the picture (``worker/queue/pictures.py``), and a copy whose picture another
    run is recognizing right now waits for that result.
    """
    started = clock.monotonic()
    outcome = _reused_or_processed(image, context, RunPictures() if pictures is None else pictures, known, token)
    if image.media == VIDEO and outcome.status == FAILED:  # a failed video keeps no appearances
        outcome = dataclasses.replace(outcome, appearances=())
    return dataclasses.replace(outcome, work_ms=round(1000 * (clock.monotonic() - started)))


def _reused_or_processed(
    image: QueuedImage,
    context: WorkerContext,
    pictures: RunPictures[tuple[str, int], ImageOutcome],
    known: dict[tuple[str, int], KnownPicture] | None,
    token: str,
) -> ImageOutcome:
    if _etag_is_md5(image):
        if known is None:
            picture = _known(context, image, image.etag, image.size)
        else:
            picture = known.get((image.etag, image.size))
        if picture is not None:
            return ImageOutcome.copied(image, picture, image.etag)
    read: list[bytes] = []
    mine: list[tuple[str, int]] = []  # the picture this image has among the run's (see RunPictures)
    outcome = None
    try:
        outcome = _process_image(image, context, read, pictures, mine, token)
    finally:
        for key in mine:
            original = outcome is not None and outcome.status == DONE and outcome.copied_from is None
            pictures.finish(key, outcome if original else None)
    if read and outcome.content_hash is None:
        outcome = dataclasses.replace(outcome, content_hash=_md5(read[0]))
    return outcome


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _etag_is_md5(image: QueuedImage) -> bool:
    """An S3 object whose ETag is the MD5 of its bytes (a single-part upload; a multipart one ends
    in ``-N``)."""
    etag = image.etag
    return (
        image.media != VIDEO  # a video's copies follow its job (worker/queue/videos.py)
        and Source.from_url(image.source).is_s3
        and len(etag) == 32
        and all(c in "0123456789abcdef" for c in etag)
    )


def _copy_of(image: QueuedImage, earlier: ImageOutcome, content_hash: str) -> ImageOutcome:
    picture = KnownPicture(earlier.image_id, earlier.width, earlier.height)
    return ImageOutcome.copied(image, picture, content_hash, earlier.result)


def _waiting_for_picture(image: QueuedImage, content_hash: str) -> ImageOutcome:
    log.info("image waits for its picture: %s/%s is a copy being recognized now", image.bucket, image.key)
    wait = timedelta(seconds=random.uniform(PICTURE_WAIT_SECONDS, 2 * PICTURE_WAIT_SECONDS))
    return ImageOutcome.waiting(image, utcnow() + wait, content_hash)


def _first_in_run(
    image: QueuedImage,
    data: bytes,
    pictures: RunPictures[tuple[str, int], ImageOutcome],
    mine: list[tuple[str, int]],
) -> ImageOutcome | None:
    """Within the run: the copy of a picture another of its images was recognized for (waiting
    for it while it is in flight), or None: this image has the picture now (added to ``mine``)."""
    key = (_md5(data), len(data))
    action, earlier = pictures.first_or_wait(key, PICTURE_PATIENCE_SECONDS)
    if action == "copy" and earlier is not None:
        return _copy_of(image, earlier, key[0])
    if action == "busy":
        return _waiting_for_picture(image, key[0])
    mine.append(key)
    return None


def _known_copy(image: QueuedImage, data: bytes, context: WorkerContext) -> ImageOutcome | None:
    """The outcome of a picture already recognized whose bytes are ``data``, copied; or None."""
    content_hash = _md5(data)
    if content_hash == image.etag and _etag_is_md5(image):
        return None  # looked up by its ETag already
    known = _known(context, image, content_hash, len(data))
    return ImageOutcome.copied(image, known, content_hash) if known is not None else None


def _wait_or_copy(image: QueuedImage, data: bytes, context: WorkerContext, token: str) -> ImageOutcome | None:
    """Before a paid call: take the picture for this run. When another live run has it, the image
    waits for that result; when the picture was recognized since the batch looked (the other run
    wrote it just now), its result is copied. None: this run calls."""
    content_hash = _md5(data)
    if context.pictures.take(Picture(image.backend, content_hash, len(data)), token):
        known = _known(context, image, content_hash, len(data))
        return ImageOutcome.copied(image, known, content_hash) if known is not None else None
    return _waiting_for_picture(image, content_hash)


def _process_image(
    image: QueuedImage,
    context: WorkerContext,
    read: list[bytes],
    pictures: RunPictures[tuple[str, int], ImageOutcome],
    mine: list[tuple[str, int]],
    token: str,
) -> ImageOutcome:
    width = height = None
    kind = Source.from_url(image.source).kind
    location = S3Location(image.bucket, image.key, image.size) if kind == "s3" else None
    try:
        recognizer = context.recognizers.get(image.backend)
        if image.media == VIDEO:
            return process_video(image, context, token)
        data = _with_retry(context, lambda: context.readers[kind].read(image.bucket, image.key, image.etag))
        read.append(data)
        if (copy := _first_in_run(image, data, pictures, mine)) is not None:
            return copy
        if (copy := _known_copy(image, data, context)) is not None:
            return copy
        loaded = decode_image(data, context.limits)
        width, height = loaded.width, loaded.height
        paid = recognizer.name in PAID_BACKENDS
        if paid and image.prefilter_faces and not context.prefilter.has_face(loaded.pixels):
            return ImageOutcome.done(image.id, width, height, RecognitionResult(), calls_saved=1)
        if paid and (waiting := _wait_or_copy(image, data, context, token)) is not None:
            return waiting
        result = _with_retry(context, lambda: recognizer.recognize(loaded, location))
        return ImageOutcome.done(image.id, width, height, result, paid_calls=int(paid))
    except TransientError as exc:
        return _transient_outcome(image, exc, context, width, height)
    except SoftTimeLimitExceeded:  # the run's time is up: not the image's fault
        raise
    except SQLAlchemyError as exc:  # a picture's lock or a copy's lookup: before any call, so no call is lost
        transient = ServiceUnavailableError(f"the results database: {exc}", code="DatabaseUnavailable")
        return _transient_outcome(image, transient, context, width, height)
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
    ceiling = doubling(RESEND_BASE_SECONDS, rounds - 1, min(RESEND_MAX_SECONDS, context.retry_deadline / 4))
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
#: ... and at most this long while its scan is a followed source's (a window of 32 slots then
#: looks every 60 ms on average, one query each: an upload is taken within a second or two).
FOLLOW_MAX_IDLE_SECONDS = 2.0


@dataclass(frozen=True)
class SlotStep:
    """What one turn of a window slot did, and when the slot should come back (None: it ends)."""

    report: BatchReport
    next_in: float | None
    idle_rounds: int = 0


def _helpable(state: ClaimState) -> bool:
    """Whether a listing may need a hand: a standing scan's images come from events, not parts."""
    return state.listing and not state.standing


def _help_list(scan_id: int, context: WorkerContext, token: str, slice_seconds: float = LIST_SLICE_SECONDS) -> bool:
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
    list_slice(part, parts, pages, deadline=clock.monotonic() + slice_seconds)
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
    context.video_completions.wake_finished(context.settings, context.store.engine)  # videos whose job ended: due
    image_ids = context.images.claim(scan_id, context.batch_size, token, context.claim_sharers)
    if image_ids:
        return SlotStep(_Run(context, token, scan_id).work(image_ids), next_in=0.0)
    state = context.images.state(scan_id)
    if state.unfollowed and context.scans.end_unfollowed(scan_id, context.lease_seconds):
        state = context.images.state(scan_id)
    if state.standing:  # events bring images any time: come back soon, whatever the window's rounds
        max_idle = min(max_idle, FOLLOW_MAX_IDLE_SECONDS)
    elif state.listing and _help_list(scan_id, context, token):
        return SlotStep(BatchReport(), next_in=0.0)
    if not state.finished and not state.listing and not state.queued:  # drained, maybe: finish it
        context.scans.finish_if_drained([scan_id])
        state = context.images.state(scan_id)
    if not state.worth_waiting and state.next_due is None:
        return SlotStep(BatchReport(), next_in=None)
    wait = doubling(IDLE_BASE_SECONDS, idle_rounds, max_idle)
    due_in = (state.next_due - utcnow()).total_seconds() if state.next_due is not None else None
    if due_in is not None and due_in > 0:  # a deferred image is due then (one due already is held by a run)
        wait = min(wait, due_in)
    return SlotStep(BatchReport(), next_in=wait, idle_rounds=idle_rounds + 1)
