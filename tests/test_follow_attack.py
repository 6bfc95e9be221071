"""Adversarial cases of following a living bucket: a bad event beside good ones, the standing
scan's figures and people counts against a recount, an overwrite racing a worker's write, receives
applied concurrently, a lost commit answer, catch-up scans (an inventory, a page recorded late) and
a second backend's follower."""

from __future__ import annotations

from collections import Counter

from sqlalchemy import func, select

from tests import test_follow
from tests.test_follow import _recognized, follower, receive_all, record, rows, send
from worker.outcomes import ImageOutcome
from worker.schema import faces, images, object_events, person_images, scans

# The fixtures of test_follow, shared (a queue made by ``follow --setup``, its SQS client, settings).
sqs, settings, queue_url = test_follow.sqs, test_follow.settings, test_follow.queue_url


def recount_matches(store) -> None:
    """person_images equals a recount from the faces of images not deleted."""
    with store.engine.connect() as conn:
        kept = Counter(
            {(r.scan_id, r.name, r.person_id): r.images for r in conn.execute(select(person_images)).all() if r.images}
        )
        person = func.coalesce(faces.c.person_id, "")
        recount = Counter(
            {
                (scan_id, name, pid): n
                for scan_id, name, pid, n in conn.execute(
                    select(images.c.scan_id, faces.c.name, person, func.count(func.distinct(faces.c.image_id)))
                    .join(images, images.c.id == faces.c.image_id)
                    .where(faces.c.name.is_not(None), images.c.deleted_at.is_(None))
                    .group_by(images.c.scan_id, faces.c.name, person)
                ).all()
            }
        )
    assert kept == recount


def figures_add_up(store, scan_id: int) -> None:
    summary = store.summary(scan_id)
    in_scan = sum(summary.counts.values())
    assert summary.listed == summary.skipped + summary.held_elsewhere + in_scan + summary.handed_over, summary


def test_a_bad_event_does_not_keep_the_good_messages_of_its_receive_from_being_applied(
    store, settings, sqs, bucket, queue_url
):
    """Values S3 never sends and the database cannot store (an ETag over 128 characters, a NUL or a
    lone surrogate in a key, a size past 64 bits) failed the receive's one transaction: the good
    message received with them was never applied and went to the dead-letter queue with them."""
    import json

    following = follower(store, settings, bucket, queue_url, sqs)
    receive_all(following)
    send(sqs, queue_url, record(bucket, "ObjectCreated:Put", "photos/good.jpg", "01", eTag="e1", size=5))
    send(sqs, queue_url, record(bucket, "ObjectCreated:Put", "photos/bad.jpg", "01", eTag="x" * 200, size=5))
    send(sqs, queue_url, record(bucket, "ObjectCreated:Put", "photos/nul%00.jpg", "01", eTag="e2", size=5))
    send(sqs, queue_url, record(bucket, "ObjectCreated:Put", "photos/big.jpg", "01", eTag="e3", size=10**20))
    surrogate = record(bucket, "ObjectRemoved:Delete", "photos/s\ud800.jpg", "01")
    sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps({"Records": [surrogate]}))

    receive_all(following)

    assert [row.key for row in rows(store)] == ["photos/good.jpg"]
    assert following.counts.malformed == 4


def test_an_overwrite_while_a_worker_recognizes_the_old_version_leaves_it_out_of_people(
    store, settings, sqs, bucket, queue_url
):
    following = follower(store, settings, bucket, queue_url, sqs)
    send(sqs, queue_url, record(bucket, "ObjectCreated:Put", "photos/k.jpg", "01", eTag="e1", size=5))
    receive_all(following)
    [old] = rows(store)
    store.images.claim_ids([old.id], "run-1")
    send(sqs, queue_url, record(bucket, "ObjectCreated:Put", "photos/k.jpg", "02", eTag="e2", size=5))
    receive_all(following)
    from worker.recognition import BoundingBox, Celebrity, RecognitionResult

    box = BoundingBox(0.1, 0.1, 0.3, 0.3)
    result = RecognitionResult(celebrities=(Celebrity(name="Ada", id="1", match_confidence=99.0, bounding_box=box),))
    store.images.write("run-1", [ImageOutcome.done(old.id, 200, 120, result)])

    assert store.people() == []
    recount_matches(store)
    _, new = rows(store)
    _recognized(store, new.id, "Grace")
    assert [(p.name, p.images) for p in store.people()] == [("Grace", 1)]
    recount_matches(store)


def test_receives_applied_concurrently_in_opposite_orders_count_each_event_once(store, settings, bucket):
    """Two followers apply the same messages at once (the visibility timeout ran out), in opposite
    orders: a deadlock is retried, no event counts twice."""
    import threading

    from producer.follow import Follower
    from worker.queue.objects import ObjectChange
    from worker.sources import parse_source

    class NoSqs:
        pass

    first = Follower(store, settings, parse_source(f"s3://{bucket}/photos/"), "q", NoSqs(), wait_seconds=1)
    second = Follower(store, settings, parse_source(f"s3://{bucket}/photos/"), "q", NoSqs(), wait_seconds=1)
    rounds, keys = 20, 30
    errors: list[BaseException] = []
    for n in range(rounds):
        changes = [ObjectChange("created", f"photos/{n}-{k}.jpg", f"{n:02d}", f"e{n}-{k}", 5) for k in range(keys)]
        removals = [ObjectChange("removed", f"photos/{n - 1}-{k}.jpg", f"{n:02d}") for k in range(keys)] if n else []

        def apply(who, batch):
            try:
                who._apply(batch, None)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [
            threading.Thread(target=apply, args=(first, changes + removals)),
            threading.Thread(target=apply, args=(second, list(reversed(removals + changes)))),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    summary = store.summary(first.scan_id)
    assert summary.events == rounds * keys + (rounds - 1) * keys
    assert summary.deletions == (rounds - 1) * keys
    assert summary.listed == rounds * keys
    figures_add_up(store, first.scan_id)


def test_a_long_life_of_keys_keeps_people_equal_to_a_recount(store, settings, s3, sqs, bucket, queue_url):
    from datetime import timedelta

    from tests.conftest import write_outcomes
    from worker.database import utcnow
    from worker.listing import ListedObject

    following = follower(store, settings, bucket, queue_url, sqs)

    def event(kind, key, seq, etag="", size=5):
        fields = dict(eTag=etag, size=size) if kind == "ObjectCreated:Put" else {}
        send(sqs, queue_url, record(bucket, kind, key, seq, **fields))
        receive_all(following)

    event("ObjectCreated:Put", "photos/a.jpg", "01", "ea1")
    event("ObjectCreated:Put", "photos/b.jpg", "01", "eb1")
    a1, b1 = rows(store)
    _recognized(store, a1.id, "Ada")
    _recognized(store, b1.id, "Ada")
    recount_matches(store)
    event("ObjectRemoved:Delete", "photos/a.jpg", "02")
    recount_matches(store)
    event("ObjectCreated:Put", "photos/a.jpg", "03", "ea1")  # back
    recount_matches(store)
    event("ObjectCreated:Put", "photos/b.jpg", "02", "eb2")  # overwrite
    recount_matches(store)
    b2 = rows(store, etag="eb2")[0]
    # a --force catch-up scan takes a over, then the follower deletes it while queued there
    with store.engine.begin() as conn:
        conn.execute(
            images.update().where(images.c.deleted_at.is_not(None)).values(deleted_at=utcnow() - timedelta(hours=1))
        )
    forced = store.create_scan(f"s3://{bucket}/photos/", "rekognition", reuse_results=False)
    store.queue_images(
        forced,
        bucket,
        "rekognition",
        [ListedObject("photos/a.jpg", "ea1", 5), ListedObject("photos/b.jpg", "eb1", 5)],
        force=True,
    )
    recount_matches(store)
    event("ObjectRemoved:Delete", "photos/a.jpg", "04")
    recount_matches(store)
    write_outcomes(store, [ImageOutcome.failed(a1.id, "ObjectNotFound", "gone")], token="forced-run")
    _recognized(store, b2.id, "Grace")
    recount_matches(store)
    event("ObjectCreated:Put", "photos/b.jpg", "03", "eb1")  # reverted to the first bytes
    recount_matches(store)
    assert sorted((p.name, p.images) for p in store.people()) == [("Ada", 1)]
    for scan_id in (following.scan_id, forced):
        figures_add_up(store, scan_id)


def test_a_receive_whose_commit_answer_was_lost_counts_nothing_twice(store, settings, sqs, bucket, queue_url):
    from tests.conftest import lost_acknowledgements

    following = follower(store, settings, bucket, queue_url, sqs)
    receive_all(following)
    send(sqs, queue_url, record(bucket, "ObjectCreated:Put", "photos/a.jpg", "01", eTag="e", size=5))
    send(sqs, queue_url, record(bucket, "ObjectRemoved:Delete", "photos/b.jpg", "01"))
    with lost_acknowledgements(store.engine):
        receive_all(following)
    summary = store.summary(following.scan_id)
    assert (summary.events, summary.deletions, summary.listed) == (2, 1, 1)


def test_an_own_failure_retried_keeps_the_standing_scan_s_figures_adding_up(store, settings, sqs, bucket, queue_url):
    """An object that failed in the standing scan and came back is queued again in its one row:
    the scan listed it once (it counted twice, and listed = skipped + held + rows + handed over broke)."""
    from tests.conftest import write_outcomes

    following = follower(store, settings, bucket, queue_url, sqs)
    send(sqs, queue_url, record(bucket, "ObjectCreated:Put", "photos/k.jpg", "01", eTag="e1", size=5))
    receive_all(following)
    [row] = rows(store)
    write_outcomes(store, [ImageOutcome.failed(row.id, "ObjectNotFound", "gone before it was read")])
    send(sqs, queue_url, record(bucket, "ObjectCreated:Put", "photos/k.jpg", "02", eTag="e1", size=5))
    receive_all(following)
    [row] = rows(store)
    assert row.status == "queued" and following.counts.queued == 2

    figures_add_up(store, following.scan_id)


def test_a_catch_up_scan_from_an_old_inventory_does_not_undo_a_later_deletion(
    store, settings, s3, sqs, bucket, queue_url, rekognition, database_url
):
    """An S3 Inventory is a report made hours or days ago: a catch-up scan from it undid a deletion
    the follower applied after the report was made (the picture gone from the bucket was back in
    people). Only deletions older than the report are undone."""
    from datetime import timedelta

    from tests.imagemaker import jpeg
    from tests.test_inventory import row, scan_inventory, write_inventory
    from worker.database import utcnow

    s3.put_object(Bucket=bucket, Key="photos/ada.jpg", Body=jpeg())
    following = follower(store, settings, bucket, queue_url, sqs)
    receive_all(following)
    [image] = rows(store)
    _recognized(store, image.id, "Ada Lovelace")
    manifest = write_inventory(s3, bucket, [[row(s3, bucket, "photos/ada.jpg")]])  # made on 2025-01-01
    s3.delete_object(Bucket=bucket, Key="photos/ada.jpg")  # long after the inventory was made
    receive_all(following)
    with store.engine.begin() as conn:  # the deletion (and its event) an hour old when the catch-up scan runs
        conn.execute(images.update().values(deleted_at=utcnow() - timedelta(hours=1)))
        conn.execute(object_events.update().values(applied_at=utcnow() - timedelta(hours=1)))

    scan_inventory(database_url, f"s3://{bucket}/photos/", manifest)

    assert rows(store)[0].deleted_at is not None, "the object is gone: an inventory from before says nothing"
    assert store.people() == []

    # A report made after the deletion that lists the object: it is back, the deletion is undone.
    import json
    import time

    bucket_name, key = manifest.removeprefix("s3://").split("/", 1)
    document = json.loads(s3.get_object(Bucket=bucket_name, Key=key)["Body"].read())
    s3.put_object(
        Bucket=bucket_name, Key=key, Body=json.dumps({**document, "creationTimestamp": str(int(time.time() * 1000))})
    )
    scan_inventory(database_url, f"s3://{bucket}/photos/", manifest)
    assert rows(store)[0].deleted_at is None
    assert [p.name for p in store.people()] == ["Ada Lovelace"]


def test_a_catch_up_page_recorded_just_after_an_overwrite_event_leaves_the_old_version_live(
    store, settings, sqs, bucket, queue_url
):
    """A catch-up scan's page lists k at e1 and d; the overwrite of k (e2) and the deletion of d are
    applied by the follower before the page is recorded: the page recorded the gone versions as live
    rows (k/e1 newer than e2's by id, so results showed it). Now they are listed and skipped; the
    same page seen more than a minute after those events is recorded as S3 listed it."""
    from datetime import timedelta

    from worker.database import utcnow
    from worker.listing import ListedObject

    following = follower(store, settings, bucket, queue_url, sqs)
    catch_up = store.create_scan(f"s3://{bucket}/photos/", "rekognition")
    page = [ListedObject("photos/k.jpg", "e1", 5), ListedObject("photos/d.jpg", "ed", 5)]  # S3 listed them
    page.append(ListedObject("photos/other.jpg", "eo", 5))  # no event: recorded as listed
    send(sqs, queue_url, record(bucket, "ObjectCreated:Put", "photos/k.jpg", "02", eTag="e2", size=5))
    send(sqs, queue_url, record(bucket, "ObjectRemoved:Delete", "photos/d.jpg", "02"))
    receive_all(following)
    report = store.queue_images(catch_up, bucket, "rekognition", page)  # the page, recorded a moment later

    live = sorted((row.key, row.etag) for row in rows(store) if row.deleted_at is None)
    assert live == [("photos/k.jpg", "e2"), ("photos/other.jpg", "eo")], "versions gone before the page was recorded"
    assert (report.listed, report.skipped) == (3, 2)
    figures_add_up(store, catch_up)

    with store.engine.begin() as conn:  # the events, long before a later listing
        conn.execute(object_events.update().values(applied_at=utcnow() - timedelta(minutes=5)))
    later = store.create_scan(f"s3://{bucket}/photos/", "rekognition")
    store.queue_images(later, bucket, "rekognition", page[:2])
    assert {(row.key, row.etag) for row in rows(store, scan_id=later)} == {
        ("photos/k.jpg", "e1"),
        ("photos/d.jpg", "ed"),
    }


def test_a_late_removal_applied_by_another_backend_s_follower_hides_a_live_object(
    store, settings, sqs, bucket, queue_url
):
    """SNS fan-out, one queue per backend: the paid follower applied create, delete, create again;
    the local follower, behind, applies the delete: it marked the paid backend's live object deleted
    (until the local follower applied the creation too). Now it marks only what no later event of
    the row's own backend overtook; the reverse (a late creation restoring a row its own follower
    saw deleted since) holds too."""
    from datetime import timedelta

    from worker.database import utcnow

    local_queue = sqs.create_queue(QueueName=f"{bucket}-local")["QueueUrl"]
    paid = follower(store, settings, bucket, queue_url, sqs)
    local = follower(store, settings.replace(backend="local"), bucket, local_queue, sqs)
    created = record(bucket, "ObjectCreated:Put", "photos/k.jpg", "01", eTag="e1", size=5)
    removed = record(bucket, "ObjectRemoved:Delete", "photos/k.jpg", "02")
    again = record(bucket, "ObjectCreated:Put", "photos/k.jpg", "03", eTag="e1", size=5)
    for event in (created, removed, again):
        send(sqs, queue_url, event)
        receive_all(paid)
    send(sqs, local_queue, created)
    send(sqs, local_queue, removed)
    receive_all(local)

    [paid_row] = rows(store, backend="rekognition")
    assert paid_row.deleted_at is None, "the paid follower's latest event is a creation"
    assert rows(store, backend="local") == [], "of the local follower's receive, the removal is the latest"

    send(sqs, queue_url, record(bucket, "ObjectRemoved:Delete", "photos/k.jpg", "04"))
    receive_all(paid)
    with store.engine.begin() as conn:  # a deletion older than a listing's minute: no other path undoes it
        conn.execute(images.update().values(deleted_at=utcnow() - timedelta(minutes=5)))
    send(sqs, local_queue, again)  # the local follower, behind again: the creation of 03
    receive_all(local)
    assert rows(store, backend="rekognition")[0].deleted_at is not None, "the paid follower saw it deleted since"
    [local_row] = rows(store, backend="local")
    assert local_row.deleted_at is None and local_row.status == "queued"


def test_a_lagging_backend_s_older_event_applied_just_now_does_not_make_a_listing_skip_the_current_version(
    store, settings, sqs, bucket, queue_url
):
    """The rekognition follower applied the creation of e2 (sequencer 05) long ago; the local
    follower, behind, applied e1's (03) just now. A listing that sees e2 records it: the key's
    latest event is e2's, and it is old."""
    from datetime import timedelta

    from worker.database import utcnow
    from worker.listing import ListedObject

    local_queue = sqs.create_queue(QueueName=f"{bucket}-local")["QueueUrl"]
    paid = follower(store, settings, bucket, queue_url, sqs)
    send(sqs, queue_url, record(bucket, "ObjectCreated:Put", "photos/k.jpg", "05", eTag="e2", size=5))
    receive_all(paid)
    with store.engine.begin() as conn:
        conn.execute(object_events.update().values(applied_at=utcnow() - timedelta(hours=2)))
    local = follower(store, settings.replace(backend="local"), bucket, local_queue, sqs)
    send(sqs, local_queue, record(bucket, "ObjectCreated:Put", "photos/k.jpg", "03", eTag="e1", size=5))
    receive_all(local)

    catch_up = store.create_scan(f"s3://{bucket}/photos/", "local")
    report = store.queue_images(catch_up, bucket, "local", [ListedObject("photos/k.jpg", "e2", 5)])

    assert report.skipped == 0
    assert [(row.etag, row.scan_id) for row in rows(store, backend="local", etag="e2")] == [("e2", catch_up)]


def test_a_listing_read_again_keeps_its_scan_s_figures_after_an_overwrite(store, settings, sqs, bucket, queue_url):
    """A listing recorded again in its own scan (an inventory's scan resumed reads it from the
    start) after the follower overwrote one of its objects: the row it recorded the first time is
    this scan's already, not skipped; the scan's figures still add up."""
    from worker.listing import ListedObject

    following = follower(store, settings, bucket, queue_url, sqs)
    scan_id = store.create_scan(f"s3://{bucket}/photos/", "rekognition")
    page = [ListedObject("photos/k.jpg", "e1", 5), ListedObject("photos/j.jpg", "ej", 5)]
    store.queue_images(scan_id, bucket, "rekognition", page)
    send(sqs, queue_url, record(bucket, "ObjectCreated:Put", "photos/k.jpg", "02", eTag="e2", size=5))
    receive_all(following)

    again = store.queue_images(scan_id, bucket, "rekognition", page)

    assert (again.listed, again.skipped) == (2, 0)
    with store.engine.begin() as conn:  # the figures as the inventory's resume rebuilds them
        conn.execute(scans.update().where(scans.c.id == scan_id).values(listed=again.listed, skipped=again.skipped))
    figures_add_up(store, scan_id)
