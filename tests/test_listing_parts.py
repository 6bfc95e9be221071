"""Listing a key space on the workers, part by part and slice by slice (worker/listing_parts.py).

The plain function against a synthetic S3 over HTTP and both databases: every key recorded once
whatever the slicing and interleaving, a lister that dies mid-part resumed after its last page, a
claim taken over after its lease, a part that cannot be listed, and a part paused by throttling.
"""

from __future__ import annotations

import itertools

import boto3
import pytest
from botocore.exceptions import ClientError
from sqlalchemy import func, select

from tests.synthetic_s3 import SyntheticBucket, serving
from worker.listing import split_key_space
from worker.listing_parts import TRANSIENT_PAUSE_SECONDS, list_part, s3_pages
from worker.queue.parts import ListingParts
from worker.schema import images, listing_parts, scans

OBJECTS = 4_000


@pytest.fixture(scope="module")
def synthetic():
    buckets = [SyntheticBucket("flat", OBJECTS), SyntheticBucket("wide", OBJECTS, prefixes=7)]
    with serving(buckets) as (url, stats):
        yield url, stats


@pytest.fixture
def s3(synthetic):
    url, _ = synthetic
    return boto3.client(
        "s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
    )


def split_scan(store, s3, bucket: str, parts: int = 8) -> tuple[int, list[int]]:
    scan_id = store.create_scan(f"s3://{bucket}/", "rekognition")
    exact, prefixes = split_key_space(s3, bucket, "", parts)
    assert not exact
    with store.engine.begin() as conn:
        return scan_id, ListingParts(store.engine).create(conn, scan_id, prefixes)


def pages(client, page_size: int = 1000, attempts: int = 5):
    return s3_pages(client, page_size=page_size, attempts=attempts)


def recorded_keys(store, scan_id: int) -> list[str]:
    with store.engine.connect() as conn:
        return list(conn.execute(select(images.c.key).where(images.c.scan_id == scan_id)).scalars())


def listing_finished(store, scan_id: int):
    with store.engine.connect() as conn:
        return conn.execute(
            select(scans.c.listing_finished_at, scans.c.listing_error).where(scans.c.id == scan_id)
        ).one()


@pytest.mark.parametrize("bucket", ["flat", "wide"])
def test_parts_listed_a_page_a_slice_in_turns_record_every_key_once(store, s3, bucket):
    scan_id, part_ids = split_scan(store, s3, bucket)
    parts = ListingParts(store.engine)
    assert len(part_ids) > 1
    waiting = list(part_ids)
    messages = itertools.count()
    while waiting:  # each turn is a new message; the parts take turns, as on a fleet
        part_id = waiting.pop(0)
        step = list_part(part_id, parts, pages(s3, page_size=40), f"message-{next(messages)}", slice_seconds=0)
        if step.next_in is not None:
            waiting.append(part_id)
        else:
            assert listing_finished(store, scan_id).listing_finished_at is None or not waiting
    keys = recorded_keys(store, scan_id)
    expected = {SyntheticBucket(bucket, OBJECTS, prefixes=7 if bucket == "wide" else 0).key(i) for i in range(OBJECTS)}
    assert len(keys) == OBJECTS and set(keys) == expected
    summary = store.summary(scan_id)
    assert summary.listed == OBJECTS and summary.listing == "listed" and summary.listing_parts == (len(part_ids),) * 2
    assert next(messages) > len(part_ids), "the parts were listed in several slices"


class DiesAfter:
    """An S3 client whose process 'dies' (an exception nothing catches) on the n-th listing call."""

    def __init__(self, s3, calls: int, error: BaseException | None = None, prefix: str | None = None) -> None:
        self.s3, self.calls, self.error, self.prefix = s3, calls, error, prefix

    def list_objects_v2(self, **arguments):
        if self.prefix is None or arguments["Prefix"] == self.prefix:
            self.calls -= 1
            if self.calls < 0:
                raise self.error or SystemExit("killed")
        return self.s3.list_objects_v2(**arguments)


def test_a_lister_that_died_mid_part_is_resumed_after_its_last_page_once_its_lease_ran_out(store, s3):
    scan_id, part_ids = split_scan(store, s3, "flat", parts=1)
    parts = ListingParts(store.engine)
    with pytest.raises(SystemExit):
        list_part(part_ids[0], parts, pages(DiesAfter(s3, 3), page_size=300), "message-a")
    assert len(recorded_keys(store, scan_id)) == 3 * 300, "the pages before the death are recorded"
    assert list_part(part_ids[0], parts, pages(s3), "message-b").listed == 0, "another run keeps off a held part"
    assert len(recorded_keys(store, scan_id)) == 900
    lapsed = ListingParts(store.engine, lease_seconds=0)  # the dead run's lease ran out
    list_part(part_ids[0], lapsed, pages(s3, page_size=300), "message-a, redelivered")
    keys = recorded_keys(store, scan_id)
    assert len(keys) == len(set(keys)) == OBJECTS
    assert listing_finished(store, scan_id).listing_finished_at is not None


def test_a_claim_that_outlived_its_lease_is_taken_over_and_the_old_holder_records_nothing(store, s3):
    scan_id, part_ids = split_scan(store, s3, "flat", parts=1)
    parts, expired = ListingParts(store.engine), ListingParts(store.engine, lease_seconds=0)
    old = parts.claim(part_ids[0], "message-old")
    assert old is not None
    assert parts.claim(part_ids[0], "message-new") is None
    assert expired.claim(part_ids[0], "message-new") is not None
    page = s3.list_objects_v2(Bucket="flat", Prefix=old.prefix, MaxKeys=10)
    from worker.listing import images_in

    assert parts.record_page(old, list(images_in(page)), page["Contents"][-1]["Key"], ended=False) is None
    assert recorded_keys(store, scan_id) == []


def test_a_part_that_cannot_be_listed_fails_the_listing_once_the_others_end(store, s3):
    scan_id, part_ids = split_scan(store, s3, "wide")
    parts = ListingParts(store.engine)
    with store.engine.connect() as conn:
        refused = conn.execute(select(listing_parts.c.prefix).where(listing_parts.c.id == part_ids[2])).scalar_one()
    denied = ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "ListObjectsV2")
    client = DiesAfter(s3, 0, denied, prefix=refused)
    for number, part_id in enumerate(part_ids):
        while (
            list_part(part_id, parts, pages(client, page_size=500), f"m{part_id}", slice_seconds=0).next_in is not None
        ):
            pass
        state = listing_finished(store, scan_id)
        if number < len(part_ids) - 1:
            assert state.listing_error is None and state.listing_finished_at is None, "other parts still list"
    state = listing_finished(store, scan_id)
    assert (
        state.listing_finished_at is None and refused in state.listing_error and "Access Denied" in state.listing_error
    )
    summary = store.summary(scan_id)
    assert summary.listing == "listing failed" and 0 < summary.listed < OBJECTS
    assert summary.listed == len(recorded_keys(store, scan_id))
    assert summary.finished_at is None, "the listed images are still to scan"


def test_a_throttled_part_is_paused_and_sent_on_later(store, s3):
    scan_id, part_ids = split_scan(store, s3, "flat", parts=1)
    parts = ListingParts(store.engine)
    slow_down = ClientError(
        {
            "Error": {"Code": "SlowDown", "Message": "Reduce your request rate"},
            "ResponseMetadata": {"HTTPStatusCode": 503},
        },
        "ListObjectsV2",
    )

    class Throttled(DiesAfter):
        def list_objects_v2(self, **arguments):
            self.calls -= 1
            if self.calls < 0:
                raise slow_down
            return self.s3.list_objects_v2(**arguments)

    step = list_part(part_ids[0], parts, pages(Throttled(s3, 2), page_size=500, attempts=2), "message-1")
    assert step.next_in == TRANSIENT_PAUSE_SECONDS and step.listed == 1000
    assert parts.claim(part_ids[0], "message-2") is not None, "the paused part's claim is let go"
    with store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(images)).scalar_one() == 1000
    assert listing_finished(store, scan_id).listing_error is None


def test_a_message_lists_other_small_parts_in_its_slice_and_names_the_one_it_cut(store, s3):
    scan_id, part_ids = split_scan(store, s3, "wide")
    parts = ListingParts(store.engine)
    first = list_part(part_ids[0], parts, pages(s3, page_size=40), "message-1", slice_seconds=0)
    assert first.part_id == part_ids[0] and first.next_in == 0.0, "its own part, cut after a page"
    whole = list_part(part_ids[1], parts, pages(s3), "message-2", slice_seconds=600, steal_seconds=600)
    assert whole.next_in is None and whole.listed == OBJECTS - 40, "one message listed the rest of every part"
    late = list_part(part_ids[0], parts, pages(s3), "message-3", slice_seconds=600, steal_seconds=600)
    assert (late.listed, late.next_in) == (0, None), "the first part's own message finds nothing left"
    keys = recorded_keys(store, scan_id)
    assert len(keys) == len(set(keys)) == OBJECTS and listing_finished(store, scan_id).listing_finished_at


def test_a_slice_cut_on_a_part_it_took_over_names_that_part(store, s3):
    scan_id, part_ids = split_scan(store, s3, "wide")
    parts = ListingParts(store.engine)
    list_part(part_ids[0], parts, pages(s3), "message-1", slice_seconds=0)  # its part is one page: it ends
    cut = list_part(part_ids[0], parts, pages(s3, page_size=40), "message-2", slice_seconds=0, steal_seconds=600)
    assert cut.part_id == part_ids[1] and cut.next_in == 0.0, "the part it took and cut is sent on"
    alone = list_part(part_ids[2], parts, pages(s3), "message-3", slice_seconds=600, steal_seconds=0)
    assert alone.next_in is None and alone.listed < OBJECTS / 4, "with no time to take others, its own part only"


def test_a_folder_listing_killed_part_way_resumes_after_its_last_key(store, tmp_path):
    """A folder is one part, listed a page at a time in walking order: a lister killed after two
    pages leaves them recorded, and another lister (once the lease ran out) lists only the rest."""
    from worker.listing import list_folder, walking_order
    from worker.listing_parts import folder_pages, list_parts_here

    folder = tmp_path / "photos"
    names = ["a.jpg", "b/c.jpg", "b/d/e.jpg", "b/f.jpg", "b.jpg", "c/g.jpg", "z.jpg"]
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(name.encode())
    walked = [item.key for item in list_folder(folder)]
    assert (
        walked
        == sorted(names, key=walking_order)
        == ["a.jpg", "b.jpg", "z.jpg", "b/c.jpg", "b/f.jpg", "b/d/e.jpg", "c/g.jpg"]
    )
    for after in walked:
        assert [item.key for item in list_folder(folder, after=after)] == walked[walked.index(after) + 1 :]

    scan_id = store.create_scan(str(folder), "local")
    with store.engine.begin() as conn:
        [part_id] = ListingParts(store.engine).create(conn, scan_id, [""])
    pages = folder_pages(page_size=2)

    def killed_after_two_pages(part):
        for number, page in enumerate(pages(part)):
            if number == 2:
                raise SystemExit("killed")
            yield page

    with pytest.raises(SystemExit):
        list_parts_here(ListingParts(store.engine), killed_after_two_pages, [part_id], "scan-1", patience=0)
    assert sorted(recorded_keys(store, scan_id)) == sorted(walked[:4])
    summary = store.summary(scan_id)
    assert summary.listing == "listing" and summary.listed == 4
    list_parts_here(ListingParts(store.engine, lease_seconds=0), pages, [part_id], "scan-1 --resume", patience=0)
    keys = recorded_keys(store, scan_id)
    assert sorted(keys) == sorted(walked) and len(keys) == len(set(keys))
    assert store.summary(scan_id).listing == "listed" and store.summary(scan_id).listed == len(walked)
