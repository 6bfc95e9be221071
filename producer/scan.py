"""Running a scan: list the source into the database while the work is handed out.

The database is the queue of record. Every listing goes through ``listing_parts`` (a folder, or a
prefix that one listing request covers, is one part; a bigger S3 key space is split into many),
each page recorded with the part's last key, so a listing interrupted anywhere resumes where it
stopped, and the last page also ends the scan's listing (``worker/queue/``). With a broker,
``scan`` splits a big S3 key space into parts for the workers to list, puts a fixed window of slots
into the broker (``worker/queue/images.py``) and returns at once (a folder or a small prefix is
listed here first); without one, a local process pool claims batches from the database while this
process lists. An S3 Inventory is read whole by this process. Nothing here holds a list of the
scan's images, so memory is flat in the bucket size.

``scan --resume`` repairs whatever an interruption left (a listing or a scan left open, parts
not listed, slots lost with a broker) and may be run any number of times; it never takes claims
that live workers hold.
"""

from __future__ import annotations

import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from producer.cost import Estimate, VideoEstimate, budget_unit_usd, price_list, usd
from producer.enqueue import check_broker, masked_broker, open_window
from producer.local_pool import default_workers, drain_scan
from worker.database import CHUNK_SIZE, chunks, masked_url
from worker.errors import (
    CelebscanError,
    ConfigurationError,
    ListingFailedError,
    ListingTakenOverError,
    VideoOverLimitsError,
)
from worker.listing import ListedObject, check_bucket, fits_in_a_page, list_folder, list_s3, split_key_space
from worker.listing_parts import Pager, folder_pages, list_parts_here, s3_pages
from worker.media.video import VideoInfo, is_video_name, probe
from worker.queue import scans as scan_states
from worker.queue.images import ImageQueue
from worker.queue.leases import keep_leases_in_a_thread
from worker.queue.parts import ListingParts, PartClaim
from worker.queue.scans import Scans
from worker.queue.videos import VideoJobs, known_video_jobs
from worker.read_models import ScanSummary
from worker.recognizers import PAID_BACKENDS, rekognition_video
from worker.settings import Settings
from worker.sources import Source, build_readers, parse_source
from worker.store import QueueReport, ResultStore

Say = Callable[[str], None]
#: Parts of an S3 key space that an embedded scan lists at once, in threads of this process.
EMBEDDED_LISTING_THREADS = 8
EMBEDDED_LISTING_PARTS = 32


@dataclass(frozen=True)
class ScanRequest:
    """What the user asked for: a new scan of ``source``, or more of scan ``resume_id``."""

    source: str | None = None
    resume_id: int | None = None
    force: bool = False
    max_cost: float | None = None
    prefilter_faces: bool = False
    inventory: str | None = None  # s3:// URL of an S3 Inventory manifest.json to read instead of listing


@dataclass(frozen=True)
class Services:
    """What a scan talks to besides the database: built from the settings, or handed in (the
    seeded simulation of faults hands in its own S3 and broker)."""

    s3: Callable[[], Any]  # an S3 client that leaves listing timestamps unparsed
    open_window: Callable[[int, Sequence[int]], object]  # (scan id, parts for the workers to list)
    check_broker: Callable[[], None]

    @classmethod
    def from_settings(cls, settings: Settings, engine: Engine | None = None) -> Services:
        def s3():
            from worker.aws import client

            return client("s3", settings, raw_timestamps=True)

        def open_scan_window(scan_id: int, part_ids: Sequence[int]) -> None:
            assert engine is not None, "a scan's window is opened on its database"
            open_window(settings, engine, scan_id, list(part_ids))

        return cls(s3=s3, open_window=open_scan_window, check_broker=lambda: check_broker(settings))


def list_source(source: Source, settings: Settings) -> Iterator[ListedObject]:
    """The source's images, after checking (for S3) that it can be listed at all (``estimate``)."""
    if source.is_s3:
        s3 = Services.from_settings(settings).s3()
        check_bucket(s3, source.bucket, source.prefix)
        return list_s3(s3, source.bucket, source.prefix)
    return list_folder(Path(source.bucket))


def run_scan(
    store: ResultStore, settings: Settings, request: ScanRequest, say: Say = print, services: Services | None = None
) -> ScanSummary:
    """Create (or resume) a scan and hand its images out; returns its summary.

    With a broker, returns once the listing is under way on the workers (or done here); without
    one, when every image is done. ``say`` receives the lines a user reads (the CLI prints them).
    """
    services = services or Services.from_settings(settings, store.engine)
    if not settings.embedded:
        services.check_broker()
    if request.resume_id is not None:
        return _resume(store, settings, request, say, services)
    source, inventory = _open_source(request, settings, services)
    budget = _budget(settings, request.max_cost, say)
    token = f"scan:{uuid.uuid4().hex[:12]}"
    parts = ListingParts(store.engine, settings.lease_seconds)
    with store.engine.begin() as conn:  # the scan, and its source as one part this command holds
        scan_id = scan_states.insert_scan(
            conn,
            source.url,
            settings.backend,
            prefilter_faces=request.prefilter_faces,
            budget_images=budget,
            budget_unit_usd=budget_unit_usd(settings, budget) if budget is not None else None,
            batch_size=settings.batch_size,
            reuse_results=not request.force,
            inventory=request.inventory,
            window=None if settings.embedded else settings.window,
        )
        [root] = parts.create(conn, scan_id, [source.prefix if source.is_s3 else ""], request.force, token)
    say(f"scan {scan_id}: {source.url} (backend {settings.backend}, database {masked_url(settings.database_url)})")
    listing = _Listing(store, settings, services, scan_id, source, request.force, inventory, token, say)
    listing.root = parts.claim(root, token)
    report: QueueReport | None
    if settings.embedded:
        report = _drain_while_listing(store, settings, scan_id, listing.set_up_and_list, say)
    else:
        report = listing.set_up_and_list(with_workers=True)
        if report is None:
            say(
                f"handing out batches through {masked_broker(settings.broker_url)} "
                f"(at most {settings.window} at a time) while they list; "
                f"watch with: celebscan status {scan_id} --watch"
            )
            return store.summary(scan_id)
    _say_listed(store, scan_id, report, budget, request.max_cost, say)
    if not settings.embedded:
        say(
            f"handing out batches through {masked_broker(settings.broker_url)} "
            f"(at most {settings.window} at a time); watch with: celebscan status {scan_id} --watch"
        )
    return store.summary(scan_id)


def _open_source(request: ScanRequest, settings: Settings, services: Services):
    """The scan's source, checked before anything is written (a bucket that cannot be listed stops
    the scan here), and the inventory's listing when it reads one instead."""
    if request.inventory is None:
        source = parse_source(request.source or "")
        if source.is_s3:
            check_bucket(services.s3(), source.bucket, source.prefix)
        return source, None
    from producer.inventory import InventoryListing, list_inventory, read_manifest
    from worker.aws import client

    s3 = client("s3", settings)
    manifest = read_manifest(s3, request.inventory)
    source = parse_source(request.source or f"s3://{manifest.source_bucket}/")
    if not source.is_s3 or source.bucket != manifest.source_bucket:
        raise ConfigurationError(
            f"the inventory {request.inventory} lists s3://{manifest.source_bucket}/, not {request.source}"
        )
    return source, InventoryListing(list_inventory(s3, manifest, source.prefix), manifest.made_at)


class _Listing:
    """A scan's listing as this process sets it up and lists it: the scan's source is one part
    (``root``) this command holds from the scan's creation on. A folder, a prefix one request
    lists whole, and an inventory are listed here, a page a transaction; a bigger key space is
    split into parts (the root replaced by them in one transaction) that the workers list, or,
    without a broker, threads here."""

    def __init__(
        self, store, settings, services, scan_id, source, force, inventory=None, token=None, say: Say = print
    ) -> None:
        self.store, self.settings, self.services, self.say = store, settings, services, say
        self.scan_id, self.source, self.force, self.inventory = scan_id, source, force, inventory
        self.parts = ListingParts(store.engine, settings.lease_seconds)
        self.token = token or f"scan:{uuid.uuid4().hex[:12]}"
        self.root: PartClaim | None = None

    def set_up_and_list(self, with_workers: bool = False) -> QueueReport | None:
        """List the source from its root part: here, or split for the workers (``with_workers``:
        a broker and a big S3 key space; then return None once they have the parts). The parts this
        command holds are renewed meanwhile: splitting a big key space takes many requests, and the
        window's slots, which work from the scan's start, would take over a root whose lease ran out."""
        if self.root is None:  # another process holds the listing: it goes on there
            return self.report()
        with keep_leases_in_a_thread(self.store.engine, lambda: [self.token], self.settings.lease_seconds):
            return self._set_up_and_list(self.root, with_workers)

    def _set_up_and_list(self, root: PartClaim, with_workers: bool) -> QueueReport | None:
        if self.inventory is not None:
            if with_workers:
                self.services.open_window(self.scan_id, ())  # the workers start on the first images recorded
            return self._record_inventory(root)
        if not self.source.is_s3:
            if with_workers:
                self.services.open_window(self.scan_id, ())
            return self.list_here([root.id])
        s3 = self.services.s3()
        try:
            big = not fits_in_a_page(s3, self.source.bucket, self.source.prefix)
            if big:
                count = self.settings.listing_parts if with_workers else EMBEDDED_LISTING_PARTS
                exact, prefixes = split_key_space(s3, self.source.bucket, self.source.prefix, count)
        except ConfigurationError as exc:
            Scans(self.store.engine).note_listing_error(self.scan_id, str(exc))
            raise ListingFailedError(
                f"{exc}; scan {self.scan_id} listed nothing: fix the cause and scan {self.source.url} again"
            ) from exc
        part_ids = self._split(root, exact, prefixes) if big else [root.id]
        if part_ids is None:
            return self.report()
        if with_workers and big:
            self.services.open_window(self.scan_id, part_ids)
            self.say(f"listing {self.source.url} on the workers: the key space split into {len(part_ids)} parts")
            return None
        if with_workers:
            self.services.open_window(self.scan_id, ())
        return self.list_here(part_ids)

    def _split(self, root: PartClaim, exact: list[ListedObject], prefixes: list[str]) -> list[int] | None:
        """The root part replaced by the split's parts, with the objects named exactly like a split
        prefix (under no part), in one transaction; with no part at all, the listing ends in it
        too. None when another process took the root over meanwhile."""
        with self.store.engine.begin() as conn:
            part_ids = self.parts.split(conn, root, prefixes)
            if part_ids is None:
                return None
            if exact:
                recorded = ImageQueue(self.store.engine, self.settings.lease_seconds).record(
                    conn, self.scan_id, self.source.bucket, self.settings.backend, exact, self.force
                )
                scan_states.count_handed_over(conn, recorded.moved)
                scan_states.set_listing_counts(
                    conn, self.scan_id, recorded.listed, recorded.skipped, recorded.held_elsewhere
                )
            if not part_ids:
                scan_states.end_listing(conn, self.scan_id)
        return part_ids

    def pager(self) -> Pager:
        if self.source.is_s3:
            return s3_pages(self.services.s3(), attempts=self.settings.max_attempts)
        return folder_pages()

    def list_here(self, part_ids: list[int]) -> QueueReport:
        """List the parts in this process (in threads when there are several), to their end."""
        patience = 2 * self.settings.lease_seconds
        if len(part_ids) <= 1:
            list_parts_here(self.parts, self.pager(), part_ids, self.token, patience)
        else:
            threads = min(EMBEDDED_LISTING_THREADS, len(part_ids))
            with ThreadPoolExecutor(threads) as pool:
                share = [part_ids[i::threads] for i in range(threads)]
                list(pool.map(lambda ids: list_parts_here(self.parts, self.pager(), ids, self.token, patience), share))
        return self.report()

    def report(self) -> QueueReport:
        """What the listing recorded so far; a listing that failed is an error the user reads."""
        summary = self.store.summary(self.scan_id)
        if summary.listing == "listing failed":
            raise ListingFailedError(
                f"{summary.listing_error}; scan {self.scan_id} recorded the {summary.listed} images listed before "
                f"that (they are scanned as usual; `celebscan scan --resume {self.scan_id}` hands them out again if "
                f"needed): fix the cause and scan {self.source.url} again for the rest"
            )
        return QueueReport([], summary.listed, summary.skipped, summary.held_elsewhere)

    def _record_inventory(self, root: PartClaim) -> QueueReport:
        try:
            return self.store.queue_images(
                self.scan_id,
                self.source.bucket,
                self.settings.backend,
                self.inventory.objects,
                force=self.force,
                listed_at=self.inventory.made_at,
                keep_ids=False,
                lease_seconds=self.settings.lease_seconds,
                part=root,
            )
        except ListingTakenOverError:  # this process stalled; the one that took over goes on
            return self.report()
        except ConfigurationError as exc:  # the listing stopped part-way (access denied, endpoint gone)
            Scans(self.store.engine).note_listing_error(self.scan_id, str(exc))
            listed = self.store.summary(self.scan_id).listed
            raise ListingFailedError(
                f"{exc}; scan {self.scan_id} recorded the {listed} images listed before that (they are scanned as "
                f"usual; `celebscan scan --resume {self.scan_id}` hands them out again if needed): fix the cause "
                f"and scan {self.source.url} again for the rest"
            ) from exc


def _say_listed(store, scan_id: int, report: QueueReport, budget: int | None, max_cost, say: Say) -> None:
    to_scan = report.listed - report.skipped - report.held_elsewhere
    line = f"listed {report.listed} images; {report.skipped} already done, {to_scan} to scan"
    if report.held_elsewhere:
        line += f"; {report.held_elsewhere} left to a scan still working on them (recognized there, once)"
    say(line)
    if budget is not None and to_scan > budget:
        say(
            f"budget {usd(max_cost or 0)} covers {budget} of {to_scan} images; "
            f"{to_scan - budget} left out, still queued: when this part is done, continue with "
            f"celebscan scan --resume {scan_id} --max-cost USD"
        )


def _resume(store: ResultStore, settings: Settings, request: ScanRequest, say: Say, services: Services) -> ScanSummary:
    """Set right and hand out again what a scan still has to do. Claims that live runs hold are
    left to them (they renew their leases): a part a live process lists, images a live worker
    recognizes; those whose lease ran out are taken by whoever claims next. The budget is renewed
    (``--max-cost``: the next part; without it: everything)."""
    scan = store.summary(request.resume_id or 0)
    settings = settings.replace(backend=scan.backend)  # the scan's own backend
    scans = Scans(store.engine)
    budget = _budget(settings, request.max_cost, say)
    scans.renew_budget(scan.id, budget)
    if budget is not None and scan.videos:  # its videos' minutes are taken out of the new budget at its price
        VideoJobs(store.engine).price_budget(scan.id, budget_unit_usd(settings, budget))
    repair = scans.repair(scan.id, settings.lease_seconds)
    if repair.listing_ended:
        say(f"scan {scan.id}: its listing had ended without being recorded as ended; now it is")
    if repair.finished:
        say(f"scan {scan.id}: nothing was left to do; it is finished now")
    scan = store.summary(scan.id)
    say(f"scan {scan.id}: resuming {scan.counts['queued']} queued images (backend {settings.backend})")
    if scan.finished_at is not None:
        return scan
    listing = _Listing(
        store, settings, services, scan.id, Source.from_url(scan.source), not _reuses(store, scan.id), say=say
    )
    to_list_here = _resume_listing(store, settings, services, listing, scan, say)
    if settings.embedded:
        _drain_while_listing(store, settings, scan.id, to_list_here, say)
    else:
        if to_list_here is not None:
            to_list_here()
        say(
            f"handing out batches through {masked_broker(settings.broker_url)}; watch with: "
            f"celebscan status {scan.id} --watch"
        )
    return store.summary(scan.id)


def _resume_listing(store, settings, services, listing: _Listing, scan, say: Say):
    """What is left of the scan's listing, and who lists it: the workers (its parts sent with the
    window), or this process (returned, to run); with a broker the window is opened here. A part
    another live process lists is left to it."""
    with_workers = not settings.embedded
    unlisted = listing.parts.unfinished(scan.id)
    if scan.listing == "listing" and scan.listing_parts is None:  # a scan from before listings had parts
        with store.engine.begin() as conn:
            root = listing.parts.create(conn, scan.id, [listing.source.prefix if listing.source.is_s3 else ""])
        unlisted = root
    inventory = _inventory_of(store, scan.id)
    first = listing.parts.unstarted_root(scan.id)
    if (inventory is not None and unlisted) or first is not None:  # the whole source: not begun, not split
        part_id = unlisted[0] if inventory is not None else first
        listing.root = listing.parts.claim(part_id, listing.token) if part_id is not None else None
        if listing.root is None:
            say("its listing goes on in another process (the scan command that started it)")
            if with_workers:
                services.open_window(scan.id, ())
            return None
        say("and its listing, which had stopped")
        if inventory is not None:
            _, listing.inventory = _open_source(ScanRequest(scan.source, inventory=inventory), settings, services)
        return lambda: listing.set_up_and_list(with_workers=with_workers)
    if unlisted:
        say(f"and the listing of {len(unlisted)} parts of its source not listed yet")
    workers_list = with_workers and listing.source.is_s3
    if with_workers:
        services.open_window(scan.id, unlisted if workers_list else ())
    if unlisted and not workers_list:
        return lambda: listing.list_here(unlisted)
    return None


def _reuses(store: ResultStore, scan_id: int) -> bool:
    from sqlalchemy import select

    from worker.schema import scans

    with store.engine.connect() as conn:
        return bool(conn.execute(select(scans.c.reuse_results).where(scans.c.id == scan_id)).scalar())


def _inventory_of(store: ResultStore, scan_id: int) -> str | None:
    from sqlalchemy import select

    from worker.schema import scans

    with store.engine.connect() as conn:
        return conn.execute(select(scans.c.inventory).where(scans.c.id == scan_id)).scalar()


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


def _drain_while_listing(
    store: ResultStore,
    settings: Settings,
    scan_id: int,
    record: Callable[[], QueueReport | None] | None,
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
            bar.total = summary.listed - summary.skipped - summary.held_elsewhere
            bar.update(summary.processed - bar.n)

        drain_scan(settings, scan_id, settings.workers or default_workers(), show_progress)
        lister.join()
        show_progress()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    summary = store.summary(scan_id)
    report = outcome.get("report")
    return (
        report
        if isinstance(report, QueueReport)
        else QueueReport([], summary.listed, summary.skipped, summary.held_elsewhere)
    )


#: Videos whose headers ``estimate`` reads at once (each a few range requests in S3).
PROBE_THREADS = 16


def estimate_source(store: ResultStore, source: Source, settings: Settings) -> Estimate:
    """Count what a Rekognition scan of ``source`` would do, writing nothing and calling nothing.

    A video's length comes from its container's header (a few range requests, never the whole
    object); a copy of a video listed before or already recognized costs nothing."""
    estimate = Estimate()
    readers = build_readers(settings)
    with ThreadPoolExecutor(PROBE_THREADS) as probes:
        for chunk in chunks(list_source(source, settings), CHUNK_SIZE):
            done = store.done_objects(source.bucket, "rekognition", [item.key for item in chunk])
            pictures = [item for item in chunk if not is_video_name(item.key)]
            known = store.known_pictures([(item.etag, item.size) for item in pictures], "rekognition").keys()
            for item in pictures:
                estimate.add(
                    item.size,
                    done=(item.key, item.etag) in done,
                    in_s3=source.is_s3,
                    max_image_bytes=settings.max_image_bytes,
                    etag=item.etag,
                    known=(item.etag, item.size) in known,
                )
            _estimate_videos(store, source, settings, readers, probes, estimate.videos, chunk, done)
    return estimate


def _estimate_videos(store, source, settings, readers, probes, videos: VideoEstimate, chunk, done) -> None:
    listed = [item for item in chunk if is_video_name(item.key)]
    known = known_video_jobs(store.engine, "rekognition", [(item.etag, item.size) for item in listed])
    to_probe = []
    for item in listed:
        videos.listed += 1
        videos.total_bytes += item.size
        if (item.key, item.etag) in done:
            videos.already_done += 1
        elif (item.etag, item.size) in known or not videos.first_of_its_bytes(item.etag, item.size):
            videos.copies += 1
        elif item.size > min(settings.max_video_bytes, rekognition_video.MAX_BYTES):
            videos.over_limits["VideoTooLarge"] += 1
        else:
            to_probe.append(item)
    reader = readers[source.kind]
    for item, info in zip(to_probe, probes.map(lambda item: _probed(reader, source, item), to_probe), strict=True):
        if isinstance(info, CelebscanError):
            (videos.over_limits if isinstance(info, VideoOverLimitsError) else videos.unreadable)[info.code] += 1
            continue
        videos.probed_ms += info.duration_ms or 0
        try:
            rekognition_video.check_limits(info, item.size, source.is_s3)
        except VideoOverLimitsError as exc:
            videos.over_limits[exc.code] += 1
            continue
        videos.billable += 1
        if info.duration_ms is None:
            videos.unknown_length += 1
        else:
            videos.billable_ms += info.duration_ms


def _probed(reader, source: Source, item: ListedObject) -> VideoInfo | CelebscanError:
    try:
        ranges = reader.ranges(source.bucket, item.key, item.etag, item.size)
        try:
            return probe(ranges)
        finally:
            ranges.close()
    except CelebscanError as exc:
        return exc
