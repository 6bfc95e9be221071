"""Running a scan: list the source into the database while the work is handed out.

The database is the queue of record. Listing streams into ``queued`` rows, a thousand at a time,
and the work starts with the first thousand: with a broker, ``scan`` splits an S3 key space into
parts for the workers to list (``worker/listing_parts.py``), puts a fixed window of slots into the
broker (``worker/claims.py``) and returns at once (a folder, an inventory or a prefix that one
listing request covers is listed here first); without one, a local process pool claims batches
from the database while this process lists. Nothing here holds a list of the scan's images, so
memory is flat in the bucket size.
"""

from __future__ import annotations

import math
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from producer.cost import Estimate, price_list, usd
from producer.embedded import default_workers, drain_scan
from producer.enqueue import check_broker, masked_broker, open_window
from worker.claims import ClaimQueue
from worker.database import CHUNK_SIZE, chunks, masked_url
from worker.errors import ConfigurationError, ListingFailedError
from worker.listing import ListedObject, check_bucket, fits_in_a_page, list_folder, list_s3, split_key_space
from worker.listing_parts import ListingParts, list_part
from worker.recognizers import PAID_BACKENDS
from worker.reports import ScanSummary
from worker.settings import Settings
from worker.sources import Source, parse_source
from worker.store import QueueReport, ResultStore

Say = Callable[[str], None]


@dataclass(frozen=True)
class ScanRequest:
    """What the user asked for: a new scan of ``source``, or more of scan ``resume_id``."""

    source: str | None = None
    resume_id: int | None = None
    force: bool = False
    max_cost: float | None = None
    prefilter_faces: bool = False
    inventory: str | None = None  # s3:// URL of an S3 Inventory manifest.json to read instead of listing


def list_source(source: Source, settings: Settings) -> Iterator[ListedObject]:
    """The source's images, after checking (for S3) that it can be listed at all."""
    if source.is_s3:
        from worker.aws import client

        s3 = client("s3", settings, raw_timestamps=True)
        check_bucket(s3, source.bucket, source.prefix)
        return list_s3(s3, source.bucket, source.prefix)
    return list_folder(Path(source.bucket))


def open_listing(request: ScanRequest, settings: Settings) -> tuple[Source, Iterator[ListedObject]]:
    """Where the scan's images are and what lists them: the source itself, or its S3 Inventory."""
    if request.inventory is None:
        source = parse_source(request.source or "")
        return source, list_source(source, settings)
    from producer.inventory import list_inventory, read_manifest
    from worker.aws import client

    s3 = client("s3", settings)
    manifest = read_manifest(s3, request.inventory)
    source = parse_source(request.source or f"s3://{manifest.source_bucket}/")
    if not source.is_s3 or source.bucket != manifest.source_bucket:
        raise ConfigurationError(
            f"the inventory {request.inventory} lists s3://{manifest.source_bucket}/, not {request.source}"
        )
    return source, list_inventory(s3, manifest, source.prefix)


def run_scan(store: ResultStore, settings: Settings, request: ScanRequest, say: Say = print) -> ScanSummary:
    """Create (or resume) a scan and hand its images out; returns its summary.

    With a broker, returns once the listing is recorded (the workers go on); without one, when
    every image is done. ``say`` receives the lines a user reads (the CLI prints them).
    """
    if not settings.embedded:
        check_broker(settings)
    if request.resume_id is not None:
        return _resume(store, settings, request, say)
    source, listing = open_listing(request, settings)
    budget = _budget(settings, request.max_cost, say)
    scan_id = store.create_scan(
        source.url,
        settings.backend,
        prefilter_faces=request.prefilter_faces,
        budget_images=budget,
        batch_size=settings.batch_size,
        reuse_results=not request.force,
    )
    say(f"scan {scan_id}: {source.url} (backend {settings.backend}, database {masked_url(settings.database_url)})")

    def record() -> QueueReport:
        return _record_listing(store, scan_id, source, settings, listing, request.force)

    if settings.embedded:
        report = _drain_while_listing(store, settings, scan_id, record, say)
    elif source.is_s3 and request.inventory is None and not _fits_in_a_page(source, settings):
        _list_on_workers(store, settings, scan_id, source, request.force, say)
        say(
            f"handing out batches through {masked_broker(settings.broker_url)} "
            f"(at most {settings.window} at a time) while they list; watch with: celebscan status {scan_id} --watch"
        )
        return store.summary(scan_id)
    else:
        open_window(settings, scan_id)
        report = record()
    say(f"listed {report.listed} images; {report.skipped} already done, {report.listed - report.skipped} to scan")
    if budget is not None and report.listed - report.skipped > budget:
        left = report.listed - report.skipped - budget
        say(
            f"budget {usd(request.max_cost or 0)} covers {budget} of {report.listed - report.skipped} images; "
            f"{left} left out, still queued: when this part is done, continue with "
            f"celebscan scan --resume {scan_id} --max-cost USD"
        )
    if not settings.embedded:
        say(
            f"handing out batches through {masked_broker(settings.broker_url)} "
            f"(at most {settings.window} at a time); watch with: celebscan status {scan_id} --watch"
        )
    return store.summary(scan_id)


def _resume(store: ResultStore, settings: Settings, request: ScanRequest, say: Say) -> ScanSummary:
    """Hand out again what a scan still has queued: its claims are released (their messages may be
    lost), the budget is renewed (``--max-cost``: the next part; without it: everything)."""
    scan = store.summary(request.resume_id or 0)
    settings = settings.replace(backend=scan.backend)  # the scan's own backend
    ClaimQueue(store.engine).release_scan(scan.id)
    budget = _budget(settings, request.max_cost, say)
    store.renew_budget(scan.id, budget)
    say(f"scan {scan.id}: resuming {scan.counts['queued']} queued images (backend {settings.backend})")
    unlisted = ListingParts(store).unfinished(scan.id)
    if unlisted:
        say(f"and the listing of {len(unlisted)} parts of its key space the workers had not finished")
    if settings.embedded:
        _drain_while_listing(store, settings, scan.id, _list_parts_here(store, settings, unlisted), say)
    else:
        open_window(settings, scan.id, unlisted)
        say(
            f"handing out batches through {masked_broker(settings.broker_url)}; watch with: "
            f"celebscan status {scan.id} --watch"
        )
    return store.summary(scan.id)


def _budget(settings: Settings, max_cost: float | None, say: Say) -> int | None:
    """The images ``max_cost`` pays for, or None (no limit)."""
    if max_cost is None:
        return None
    if settings.backend not in PAID_BACKENDS:
        say(f"--max-cost: backend {settings.backend} costs nothing; every image is sent")
        return None
    prices = price_list(settings)
    affordable = prices.images_within(max_cost, settings.rekognition_billed_this_month)
    cost = prices.cost(affordable, settings.rekognition_billed_this_month)
    say(f"budget {usd(max_cost)} pays for {affordable} images (at most {usd(cost)})")
    return affordable


def _record_listing(
    store: ResultStore, scan_id: int, source: Source, settings: Settings, listing: Iterator[ListedObject], force: bool
) -> QueueReport:
    try:
        return store.queue_images(scan_id, source.bucket, settings.backend, listing, force=force, keep_ids=False)
    except ConfigurationError as exc:  # the listing stopped part-way (access denied, endpoint gone)
        store.record_listing_error(scan_id, str(exc))
        listed = store.summary(scan_id).listed
        raise ListingFailedError(
            f"{exc}; scan {scan_id} recorded the {listed} images listed before that (they are scanned as usual; "
            f"`celebscan scan --resume {scan_id}` hands them out again if needed): fix the cause and scan "
            f"{source.url} again for the rest"
        ) from exc


def _fits_in_a_page(source: Source, settings: Settings) -> bool:
    """A source one listing request covers is listed here (``scan`` then says what is new); a
    bigger one is listed by the workers."""
    from worker.aws import client

    try:
        return fits_in_a_page(client("s3", settings, raw_timestamps=True), source.bucket, source.prefix)
    except ConfigurationError:
        return True  # listed here, where the error is recorded as the listing's


def _list_on_workers(
    store: ResultStore, settings: Settings, scan_id: int, source: Source, force: bool, say: Say
) -> None:
    """Split the key space into parts, record them, and send them to the workers with the window."""
    from worker.aws import client

    s3 = client("s3", settings, raw_timestamps=True)
    try:
        exact, prefixes = split_key_space(s3, source.bucket, source.prefix, settings.listing_parts)
        # Objects named exactly like a split prefix are not under any part: recorded here.
        store.queue_images(scan_id, source.bucket, settings.backend, exact, force=force, keep_ids=False, ended=False)
    except ConfigurationError as exc:
        store.record_listing_error(scan_id, str(exc))
        raise ListingFailedError(
            f"{exc}; scan {scan_id} listed nothing: fix the cause and scan {source.url} again"
        ) from exc
    parts = ListingParts(store)
    part_ids = parts.create(scan_id, prefixes, force)
    if not part_ids:
        parts.end_listing_if_done(scan_id)
    open_window(settings, scan_id, part_ids)
    say(f"listing {source.url} on the workers: the key space split into {len(part_ids)} parts")


def _list_parts_here(store: ResultStore, settings: Settings, part_ids: list[int]) -> Callable[[], QueueReport] | None:
    """Embedded ``--resume`` of a scan the workers were listing: list its unfinished parts in this process."""
    if not part_ids:
        return None

    def list_parts() -> QueueReport:
        from worker.aws import client

        parts, s3 = ListingParts(store), client("s3", settings, raw_timestamps=True)
        token = f"resume-{uuid.uuid4()}"
        for part_id in part_ids:
            list_part(part_id, parts, s3, token, slice_seconds=math.inf, attempts=settings.max_attempts)
        return QueueReport([], 0, 0)

    return list_parts


def _drain_while_listing(
    store: ResultStore,
    settings: Settings,
    scan_id: int,
    record: Callable[[], QueueReport] | None,
    say: Say,
) -> QueueReport:
    """Embedded: a local process pool claims batches while this process lists (in a thread)."""
    from tqdm import tqdm

    outcome: dict[str, object] = {}

    def list_in_background() -> None:
        try:
            outcome["report"] = record() if record else None
        except BaseException as exc:  # raised here, in the caller's thread, after the pool stops
            outcome["error"] = exc

    lister = threading.Thread(target=list_in_background, name="celebscan-listing", daemon=True)
    lister.start()
    with tqdm(unit="img", desc="scanning", disable=None, file=sys.stderr) as bar:

        def show_progress() -> None:
            summary = store.summary(scan_id)
            bar.total = summary.listed - summary.skipped
            bar.update(summary.processed - bar.n)

        drain_scan(settings, scan_id, settings.workers or default_workers(), show_progress)
        lister.join()
        show_progress()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    summary = store.summary(scan_id)
    report = outcome.get("report")
    return report if isinstance(report, QueueReport) else QueueReport([], summary.listed, summary.skipped)


def estimate_source(store: ResultStore, source: Source, settings: Settings) -> Estimate:
    """Count what a Rekognition scan of ``source`` would do, writing nothing and calling nothing."""
    estimate = Estimate()
    for chunk in chunks(list_source(source, settings), CHUNK_SIZE):
        done = store.done_objects(source.bucket, "rekognition", [item.key for item in chunk])
        known = store.known_pictures([(item.etag, item.size) for item in chunk], "rekognition").keys()
        for item in chunk:
            estimate.add(
                item.size,
                done=(item.key, item.etag) in done,
                in_s3=source.is_s3,
                max_image_bytes=settings.max_image_bytes,
                etag=item.etag,
                known=(item.etag, item.size) in known,
            )
    return estimate
