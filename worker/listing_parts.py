"""Listing a scan's source part by part, a slice at a time (the part's states: ``worker/queue/parts.py``).

Every scan lists its source through parts. With a broker, ``celebscan scan s3://...`` splits the
key space (``worker.listing.split_key_space``), records one ``listing_parts`` row per part and sends
one ``celebscan.list_part`` message per part, then returns: the fleet lists the bucket in parallel,
as many parts at once as it has processes. A folder, or a prefix that one request lists whole, is
one part that ``scan`` lists itself; so is every part of an embedded scan.

A worker lists its part for at most ``LIST_SLICE_SECONDS`` and sends the part on as a new message, so
a message never outlives the broker's visibility timeout and listing and recognition take turns on
every worker (they are on two queues, which a worker serves in turn). A part that ends before the
slice does is followed, for two seconds more, by other parts nobody is listing, so many small
parts cost few messages and recognition still gets its turns. Each page of keys is recorded
with the part's last key in one transaction; a part picked up again lists on after that key, so a
lister dying mid-part loses nothing and doubles nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from worker import clock
from worker.aws import AWS_ERRORS, translate
from worker.database import CHUNK_SIZE
from worker.errors import CelebscanError, TransientError
from worker.listing import ListedObject, images_in, list_folder
from worker.queue.parts import ListingParts, PartClaim
from worker.retry import call_with_retry

log = logging.getLogger(__name__)

#: How long one message lists its part before sending the part on.
LIST_SLICE_SECONDS = 10.0
#: How long a message goes on with other parts once its own has ended.
STEAL_SECONDS = 2.0
#: A part whose listing outlasted the in-process retries (throttling, 5xx) is sent on after this.
TRANSIENT_PAUSE_SECONDS = 30.0


@dataclass(frozen=True)
class Page:
    objects: list[ListedObject]
    last_key: str | None  # the last key the page covers (None: an empty page)
    ended: bool  # the part has nothing after this page


#: The pages of a part from where it stands (its ``last_key``), one request or chunk at a time.
Pager = Callable[[PartClaim], Iterator[Page]]


@dataclass(frozen=True)
class PartStep:
    """What one slice did: images recorded, and which part to send on and when (``next_in`` None:
    nothing to send on: the parts it listed ended, or another holder has them)."""

    listed: int
    next_in: float | None
    part_id: int | None = None


def s3_pages(s3_client, *, attempts: int = 5, page_size: int = 1000) -> Pager:
    """An S3 part's pages (ListObjectsV2 after its last key), each request retried on transient errors."""

    def pages(part: PartClaim) -> Iterator[Page]:
        arguments: dict = {"Bucket": part.bucket, "Prefix": part.prefix, "MaxKeys": page_size}
        if part.last_key is not None:
            arguments["StartAfter"] = part.last_key

        def next_page() -> dict:
            try:
                return s3_client.list_objects_v2(**arguments)
            except AWS_ERRORS as exc:
                raise translate(exc, f"listing s3://{part.bucket}/{part.prefix}") from exc

        while True:
            page = call_with_retry(next_page, attempts=attempts)
            contents = page.get("Contents", ())
            ended = not page.get("IsTruncated")
            yield Page(list(images_in(page)), contents[-1]["Key"] if contents else None, ended)
            if ended:
                return
            arguments.pop("StartAfter", None)
            arguments["ContinuationToken"] = page["NextContinuationToken"]

    return pages


def folder_pages(page_size: int = CHUNK_SIZE) -> Pager:
    """A folder's pages: its image files in walking order, after the part's last key. A page ends
    at a file whose name is its key (not one recorded by a printable stand-in for a name that is
    not UTF-8, which would not sort where the walk puts it), so a resumed walk starts right."""

    def pages(part: PartClaim) -> Iterator[Page]:
        page: list[ListedObject] = []
        for item in list_folder(Path(part.bucket), after=part.last_key):
            page.append(item)
            if len(page) >= page_size and (item.error is None or item.error[0] != "InvalidFileName"):
                yield Page(page, page[-1].key, ended=False)
                page = []
        yield Page(page, page[-1].key if page else None, ended=True)

    return pages


def list_part(
    part_id: int,
    parts: ListingParts,
    pages: Pager,
    token: str,
    *,
    slice_seconds: float = LIST_SLICE_SECONDS,
    steal_seconds: float = STEAL_SECONDS,
) -> PartStep:
    """List one slice: pages of the part until the slice's time is up; a part that ends before
    then is followed, for ``steal_seconds`` more, by other parts of the scan nobody is listing (so
    a bucket of many small parts costs a message per few seconds, not per part, and the worker
    still takes its turns at recognizing).

    A transient error that outlasts the in-process retries pauses the part (sent on later); a
    permanent one (access denied, bucket gone) fails the part, and the scan's listing with it once
    every other part has ended. Returns the part to send on, if any, and when.
    """
    deadline = clock.monotonic() + slice_seconds
    part = parts.claim(part_id, token)
    if part is None:  # listed already, or held by another run: help with the scan's other parts
        deadline = min(deadline, clock.monotonic() + steal_seconds)
        scan_id = parts.scan_of(part_id)
        part = parts.claim_next(scan_id, token) if scan_id is not None else None
    listed = 0
    while part is not None:
        count, next_in = list_slice(part, parts, pages, deadline)
        listed += count
        if next_in is not None:
            return PartStep(listed, next_in, part.id)
        # Other parts only briefly: the worker's next turn may be a batch to recognize.
        deadline = min(deadline, clock.monotonic() + steal_seconds)
        if clock.monotonic() >= deadline:
            break
        part = parts.claim_next(part.scan_id, token)
    return PartStep(listed, None)


def list_slice(part: PartClaim, parts: ListingParts, pages: Pager, deadline: float) -> tuple[int, float | None]:
    """(images recorded, seconds before the part is sent on; None: it ended, failed or is lost)."""
    listed = 0
    iterator = pages(part)
    while True:
        try:
            page = next(iterator)
        except TransientError as exc:
            log.warning("listing part %d (%r) paused: %s", part.id, part.prefix, exc)
            parts.release(part)
            return listed, TRANSIENT_PAUSE_SECONDS
        except CelebscanError as exc:
            log.error("listing part %d (%r) failed: %s", part.id, part.prefix, exc)
            parts.fail(part, str(exc))
            return listed, None
        recorded = parts.record_page(part, page.objects, page.last_key, page.ended)
        if recorded is None:
            log.info("listing part %d: another run holds it now", part.id)
            return listed, None
        part = recorded
        listed += len(page.objects)
        if page.ended:
            return listed, None
        if clock.monotonic() >= deadline:
            parts.release(part)
            return listed, 0.0


def list_parts_here(parts: ListingParts, pages: Pager, part_ids: list[int], token: str, patience: float) -> None:
    """List the parts to their end in this process (an embedded scan, a folder, a small prefix).

    A part another process holds (an earlier ``scan`` killed a moment ago) is waited for until its
    lease runs out (at most ``patience`` seconds), then listed here; a part paused by transient
    errors is listed again after the pause.
    """
    give_up_at = clock.monotonic() + patience
    for part_id in part_ids:
        while parts.is_open(part_id):
            part = parts.claim(part_id, token)
            if part is not None:
                _, pause = list_slice(part, parts, pages, deadline=float("inf"))
                if pause:
                    clock.sleep(pause)
                continue
            if clock.monotonic() > give_up_at:
                log.warning("part %d is still held by another process; leaving it to that process", part_id)
                break
            clock.sleep(min(5.0, parts.lease.total_seconds() / 4))
