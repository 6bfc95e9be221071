"""Planning a scan: list the source, record every image as queued, then run or enqueue batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from producer.cost import Estimate
from producer.listing import ListedObject, Source, check_bucket, list_folder, list_s3
from worker.errors import ConfigurationError, ListingFailedError
from worker.settings import Settings
from worker.store import CHUNK_SIZE, QueueReport, ResultStore, chunks


@dataclass(frozen=True)
class PlannedScan:
    scan_id: int
    source: Source
    queue: QueueReport


def list_source(source: Source, settings: Settings) -> Iterator[ListedObject]:
    """The source's images, after checking (for S3) that it can be listed at all."""
    if source.is_s3:
        from worker.aws import client

        s3 = client("s3", settings)
        check_bucket(s3, source.bucket, source.prefix)
        return list_s3(s3, source.bucket, source.prefix)
    return list_folder(Path(source.bucket))


def plan_scan(
    store: ResultStore, source: Source, settings: Settings, *, force: bool = False, prefilter_faces: bool = False
) -> PlannedScan:
    """Create the scan row and queue every listed image that is not already done."""
    listing = list_source(source, settings)
    backend = settings.backend
    scan_id = store.create_scan(source.url, backend, prefilter_faces=prefilter_faces)
    try:
        report = store.queue_images(scan_id, source.bucket, backend, listing, force=force)
    except ConfigurationError as exc:  # the listing stopped part-way (access denied, endpoint gone)
        store.record_listing_error(scan_id, str(exc))
        listed = store.summary(scan_id).listed
        raise ListingFailedError(
            f"{exc}; scan {scan_id} recorded the {listed} images listed before that as queued: "
            f"`celebscan scan --resume {scan_id}` scans them, or fix the cause and scan {source.url} again"
        ) from exc
    if not report.image_ids:
        store.finish_scans([scan_id])
    return PlannedScan(scan_id=scan_id, source=source, queue=report)


def estimate_source(store: ResultStore, source: Source, settings: Settings) -> Estimate:
    """Count what a Rekognition scan of ``source`` would do, writing nothing and calling nothing."""
    estimate = Estimate()
    for chunk in chunks(list_source(source, settings), CHUNK_SIZE):
        done = store.done_objects(source.bucket, "rekognition", [item.key for item in chunk])
        for item in chunk:
            estimate.add(
                item.size,
                done=(item.key, item.etag) in done,
                in_s3=source.is_s3,
                max_image_bytes=settings.max_image_bytes,
            )
    return estimate


def split_batches(image_ids: Sequence[int], batch_size: int, workers: int, *, balance: bool = True) -> list[list[int]]:
    """Batches of at most ``batch_size``; with ``balance``, small enough that every worker gets several."""
    if not image_ids:
        return []
    size = batch_size
    if balance:
        size = max(1, min(batch_size, -(-len(image_ids) // (workers * 4))))
    return [list(image_ids[i : i + size]) for i in range(0, len(image_ids), size)]
