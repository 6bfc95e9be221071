"""Planning a scan: list the source, record every image as queued, then run or enqueue batches."""

from __future__ import annotations

from dataclasses import dataclass

from producer.listing import Source, list_folder
from worker.errors import ConfigurationError
from worker.store import QueueReport, ResultStore


@dataclass(frozen=True)
class PlannedScan:
    scan_id: int
    source: Source
    queue: QueueReport


def plan_scan(store: ResultStore, source: Source, backend: str, *, force: bool = False) -> PlannedScan:
    """Create the scan row and queue every listed image that is not already done."""
    if source.is_s3:
        raise ConfigurationError("S3 sources are not supported yet; scan a local folder")
    scan_id = store.create_scan(source.url, backend)
    report = store.queue_images(scan_id, source.bucket, backend, list_folder(source.bucket), force=force)
    if not report.image_ids:
        store.finish_scan(scan_id)
    return PlannedScan(scan_id=scan_id, source=source, queue=report)
