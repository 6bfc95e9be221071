"""Planning a scan: list the source, record every image as queued, then run or enqueue batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from producer.listing import Source, check_bucket, list_folder, list_s3
from worker.settings import Settings
from worker.store import QueueReport, ResultStore


@dataclass(frozen=True)
class PlannedScan:
    scan_id: int
    source: Source
    queue: QueueReport


def plan_scan(store: ResultStore, source: Source, settings: Settings, *, force: bool = False) -> PlannedScan:
    """Create the scan row and queue every listed image that is not already done."""
    if source.is_s3:
        from worker.aws import client

        s3 = client("s3", settings)
        check_bucket(s3, source.bucket, source.prefix)
        listing = list_s3(s3, source.bucket, source.prefix)
    else:
        listing = list_folder(source.bucket)
    backend = settings.backend
    scan_id = store.create_scan(source.url, backend)
    report = store.queue_images(scan_id, source.bucket, backend, listing, force=force)
    if not report.image_ids:
        store.finish_scan(scan_id)
    return PlannedScan(scan_id=scan_id, source=source, queue=report)


def split_batches(image_ids: Sequence[int], batch_size: int, workers: int, *, balance: bool = True) -> list[list[int]]:
    """Batches of at most ``batch_size``; with ``balance``, small enough that every worker gets several."""
    if not image_ids:
        return []
    size = batch_size
    if balance:
        size = max(1, min(batch_size, -(-len(image_ids) // (workers * 4))))
    return [list(image_ids[i : i + size]) for i in range(0, len(image_ids), size)]
