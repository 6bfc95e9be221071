"""Following a living bucket: S3 → SQS notifications (moto's server sends them as S3 does) applied
to the source's standing scan; deletions left out of the read side; the bad-input matrix of events
(malformed, other buckets and prefixes, non-image keys, duplicated and reordered deliveries)."""

from __future__ import annotations

import json
import logging
import signal
import threading
import uuid

import boto3
import pytest
from click.testing import CliRunner
from sqlalchemy import select

from producer.cli import cli
from producer.follow import Follower, run_follow
from tests.imagemaker import jpeg, jpeg_with_comment
from tests.rekognition_standin import celebrity
from worker.batch import take_next_batch
from worker.outcomes import ImageOutcome
from worker.queue.scans import Scans
from worker.recognition import BoundingBox, Celebrity, RecognitionResult
from worker.schema import DONE, QUEUED, images, object_events, scans
from worker.settings import Settings
from worker.sources import parse_source
from worker.store import ResultStore

NAMES = ["plain.jpg", "with space.jpg", "a+b.jpg", "100%.jpg", "été/北京 ☃.jpg"]


@pytest.fixture
def sqs(aws_env, moto_url, monkeypatch):
    for service in ("SQS", "STS"):
        monkeypatch.setenv(f"AWS_ENDPOINT_URL_{service}", moto_url)
    return boto3.client("sqs")


@pytest.fixture
def settings(database_url):
    return Settings(database_url=database_url, backend="rekognition")


@pytest.fixture
def queue_url(sqs, s3, bucket, database_url) -> str:
    """The queue ``follow --setup`` made for ``s3://bucket/photos/``."""
    result = CliRunner().invoke(
        cli, ["follow", f"s3://{bucket}/photos/", "--setup"], env={"CELEBSCAN_DATABASE_URL": database_url}
    )
    assert result.exit_code == 0, result.output
    [url] = [line.split(": ", 1)[1] for line in result.output.splitlines() if line.startswith("queue: ")]
    return url


def follower(store, settings, bucket, queue_url, sqs, prefix="photos/") -> Follower:
    return Follower(store, settings, parse_source(f"s3://{bucket}/{prefix}"), queue_url, sqs, wait_seconds=1)


def receive_all(follower: Follower) -> None:
    """Receive until a receive brings nothing (long polling of 1 s: the queue is empty)."""
    while follower.receive_once():
        pass


def rows(store, **where) -> list:
    query = select(images).order_by(images.c.id)
    for column, value in where.items():
        query = query.where(images.c[column] == value)
    with store.engine.connect() as conn:
        return conn.execute(query).all()


def waiting(sqs, url: str) -> int:
    attributes = sqs.get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    )["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"]) + int(attributes["ApproximateNumberOfMessagesNotVisible"])


def send(sqs, url: str, *records: dict) -> None:
    sqs.send_message(QueueUrl=url, MessageBody=json.dumps({"Records": list(records)}))


def record(bucket: str, name: str, key: str, sequencer: str, **fields) -> dict:
    return {
        "eventName": name,
        "eventTime": "2026-11-30T10:00:00.000Z",
        "s3": {"bucket": {"name": bucket}, "object": {"key": key, "sequencer": sequencer, **fields}},
    }


def test_uploads_and_deletions_reach_the_standing_scan_and_every_message_is_deleted(
    store, settings, s3, sqs, bucket, queue_url
):
    picture = jpeg()
    for name in NAMES:
        s3.put_object(Bucket=bucket, Key=f"photos/{name}", Body=jpeg_with_comment(picture, name))
    s3.put_object(Bucket=bucket, Key="photos/notes.txt", Body=b"not an image")
    s3.put_object(Bucket=bucket, Key="elsewhere/x.jpg", Body=picture)  # not sent: outside the prefix
    s3.put_object(Bucket=bucket, Key="photos/folder/", Body=b"")

    following = follower(store, settings, bucket, queue_url, sqs)
    receive_all(following)

    queued = rows(store, scan_id=following.scan_id)
    assert sorted(row.key for row in queued) == sorted(f"photos/{name}" for name in NAMES)
    assert {row.status for row in queued} == {QUEUED}
    assert following.counts.ignored >= 2 and following.counts.malformed == 0
    summary = store.summary(following.scan_id)
    assert summary.standing and summary.listing == "following" and summary.listed == len(NAMES)

    s3.delete_object(Bucket=bucket, Key="photos/a+b.jpg")
    receive_all(following)

    deleted = [row.key for row in rows(store) if row.deleted_at is not None]
    assert deleted == ["photos/a+b.jpg"]
    assert store.summary(following.scan_id).deletions == 1
    assert waiting(sqs, queue_url) == 0, "every applied message is deleted from the queue"


def test_a_deleted_picture_leaves_people_and_results_unless_asked_and_comes_back_with_its_bytes(
    store, settings, s3, sqs, bucket, queue_url
):
    body = jpeg()
    s3.put_object(Bucket=bucket, Key="photos/ada.jpg", Body=body)
    following = follower(store, settings, bucket, queue_url, sqs)
    receive_all(following)
    [row] = rows(store, key="photos/ada.jpg")
    _recognized(store, row.id, "Ada Lovelace")
    assert [p.name for p in store.people()] == ["Ada Lovelace"]

    s3.delete_object(Bucket=bucket, Key="photos/ada.jpg")
    receive_all(following)

    assert store.people() == [] and store.people(following.scan_id) == []
    assert [p.name for p in store.people(include_deleted=True)] == ["Ada Lovelace"]
    assert list(store.result_records()) == []
    [kept] = store.result_records(include_deleted=True)
    assert kept.key == "photos/ada.jpg" and kept.to_dict()["deleted_at"]
    for command in (["people"], ["results"]):
        shown = CliRunner().invoke(cli, command, env={"CELEBSCAN_DATABASE_URL": settings.database_url})
        assert "Ada" not in shown.output
        shown = CliRunner().invoke(
            cli, [*command, "--include-deleted"], env={"CELEBSCAN_DATABASE_URL": settings.database_url}
        )
        assert "Ada Lovelace" in shown.output

    s3.put_object(Bucket=bucket, Key="photos/ada.jpg", Body=body)  # the same bytes again
    receive_all(following)

    assert [p.name for p in store.people()] == ["Ada Lovelace"], "its result stands again, and counts"
    assert [r.key for r in store.result_records()] == ["photos/ada.jpg"]
    assert len(rows(store)) == 1 and rows(store)[0].status == DONE, "done before with that ETag: not paid again"


def test_an_overwrite_supersedes_the_old_version_in_people_and_results(store, settings, s3, sqs, bucket, queue_url):
    s3.put_object(Bucket=bucket, Key="photos/who.jpg", Body=jpeg_with_comment(jpeg(), "first"))
    following = follower(store, settings, bucket, queue_url, sqs)
    receive_all(following)
    [first] = rows(store, key="photos/who.jpg")
    _recognized(store, first.id, "Ada Lovelace")

    s3.put_object(Bucket=bucket, Key="photos/who.jpg", Body=jpeg_with_comment(jpeg(), "second"))
    receive_all(following)

    old, new = rows(store, key="photos/who.jpg")
    assert old.id == first.id and old.deleted_at is not None and new.status == QUEUED and new.deleted_at is None
    assert store.people() == [], "the old version's people are gone with it"
    _recognized(store, new.id, "Grace Hopper")
    assert [(p.name, p.images) for p in store.people()] == [("Grace Hopper", 1)]
    assert [r.etag for r in store.result_records()] == [new.etag]


def test_bytes_that_come_back_are_the_result_again_even_behind_a_deleted_newer_version(
    store, settings, s3, sqs, bucket, queue_url
):
    first_bytes = jpeg_with_comment(jpeg(), "first")
    s3.put_object(Bucket=bucket, Key="photos/who.jpg", Body=first_bytes)
    following = follower(store, settings, bucket, queue_url, sqs)
    receive_all(following)
    _recognized(store, rows(store)[0].id, "Ada Lovelace")
    s3.put_object(Bucket=bucket, Key="photos/who.jpg", Body=jpeg_with_comment(jpeg(), "second"))
    receive_all(following)
    _recognized(store, rows(store)[1].id, "Grace Hopper")

    s3.put_object(Bucket=bucket, Key="photos/who.jpg", Body=first_bytes)  # reverted
    receive_all(following)

    first, second = rows(store)
    assert first.deleted_at is None and second.deleted_at is not None
    assert [(p.name, p.images) for p in store.people()] == [("Ada Lovelace", 1)]
    assert [r.etag for r in store.result_records()] == [first.etag], "the newer row is deleted: it hides nothing"
    assert [r.etag for r in store.result_records(key="photos/who.jpg")] == [first.etag]


def test_an_object_that_failed_in_the_standing_scan_is_tried_again_when_it_comes_back(
    store, settings, sqs, bucket, queue_url
):
    from tests.conftest import write_outcomes

    following = follower(store, settings, bucket, queue_url, sqs)
    created = record(bucket, "ObjectCreated:Put", "photos/k.jpg", "01", eTag="e1", size=5)
    send(sqs, queue_url, created)
    receive_all(following)
    [row] = rows(store)
    write_outcomes(store, [ImageOutcome.failed(row.id, "ObjectNotFound", "gone before it was read")])
    listed = store.summary(following.scan_id).listed

    send(sqs, queue_url, record(bucket, "ObjectCreated:Put", "photos/k.jpg", "02", eTag="e1", size=5))
    send(sqs, queue_url, record(bucket, "ObjectCreated:Put", "photos/k.jpg", "02", eTag="e1", size=5))
    receive_all(following)

    [row] = rows(store)
    assert (row.status, row.error_code, row.scan_id) == (QUEUED, None, following.scan_id)
    assert store.summary(following.scan_id).listed == listed, "still one row of the scan: not listed twice"
    assert following.counts.queued == 2


def test_a_catch_up_listing_undoes_a_deletion_whose_object_is_back(store, settings, s3, sqs, bucket, queue_url):
    from datetime import timedelta

    from worker.database import utcnow
    from worker.listing import ListedObject

    s3.put_object(Bucket=bucket, Key="photos/ada.jpg", Body=jpeg())
    following = follower(store, settings, bucket, queue_url, sqs)
    receive_all(following)
    [row] = rows(store)
    _recognized(store, row.id, "Ada Lovelace")
    s3.delete_object(Bucket=bucket, Key="photos/ada.jpg")
    receive_all(following)
    listed_again = [ListedObject(row.key, row.etag, row.size)]  # the re-upload's event was lost
    scan_id = store.create_scan(f"s3://{bucket}/photos/", "rekognition")

    store.queue_images(scan_id, bucket, "rekognition", listed_again)
    assert rows(store)[0].deleted_at is not None, "a deletion of the last minute stands against a listing"

    with store.engine.begin() as conn:  # the deletion, and the event that told it, five minutes ago
        conn.execute(images.update().values(deleted_at=utcnow() - timedelta(minutes=5)))
        conn.execute(object_events.update().values(applied_at=utcnow() - timedelta(minutes=5)))
    report = store.queue_images(
        store.create_scan(f"s3://{bucket}/photos/", "rekognition"), bucket, "rekognition", listed_again
    )

    assert report.skipped == 1 and rows(store)[0].deleted_at is None
    assert [(p.name, p.images) for p in store.people()] == [("Ada Lovelace", 1)]


def test_a_versioned_bucket_s_deleted_version_leaves_the_current_one_live(store, settings, s3, sqs, bucket, queue_url):
    """In a versioned bucket, ``ObjectRemoved:Delete`` with a version id deletes that version for
    good: an old one (the current stays), or the current one (the one before is current again).
    The follower asks S3 what is current; a delete marker (a plain delete) removes the object."""
    versioned = f"{bucket}-v"  # no notifications: the events below are the only ones
    s3.create_bucket(Bucket=versioned)
    s3.put_bucket_versioning(Bucket=versioned, VersioningConfiguration={"Status": "Enabled"})
    oldest = s3.put_object(Bucket=versioned, Key="photos/k.jpg", Body=jpeg_with_comment(jpeg(), "oldest"))
    first = s3.put_object(Bucket=versioned, Key="photos/k.jpg", Body=jpeg())
    second = s3.put_object(Bucket=versioned, Key="photos/k.jpg", Body=jpeg_with_comment(jpeg(), "second"))
    etags = [first["ETag"].strip('"'), second["ETag"].strip('"')]
    following = follower(store, settings, versioned, queue_url, sqs)
    for sequencer, response in (("01", first), ("02", second)):
        size = s3.head_object(Bucket=versioned, Key="photos/k.jpg", VersionId=response["VersionId"])["ContentLength"]
        send(
            sqs,
            queue_url,
            record(versioned, "ObjectCreated:Put", "photos/k.jpg", sequencer, eTag=response["ETag"], size=size),
        )
        receive_all(following)

    def live() -> list[str]:
        return [row.etag for row in rows(store) if row.deleted_at is None]

    assert live() == [etags[1]]

    s3.delete_object(Bucket=versioned, Key="photos/k.jpg", VersionId=oldest["VersionId"])  # an old version
    send(sqs, queue_url, record(versioned, "ObjectRemoved:Delete", "photos/k.jpg", "03", versionId=oldest["VersionId"]))
    receive_all(following)
    assert live() == [etags[1]], "the current version is still there"

    s3.delete_object(Bucket=versioned, Key="photos/k.jpg", VersionId=second["VersionId"])  # the current one
    send(sqs, queue_url, record(versioned, "ObjectRemoved:Delete", "photos/k.jpg", "04", versionId=second["VersionId"]))
    receive_all(following)
    assert live() == [etags[0]], "the version before is current again: its row is back, the deleted one is gone"
    assert len(rows(store)) == 2, "no new row, no new call: the first picture's row is restored"

    s3.delete_object(Bucket=versioned, Key="photos/k.jpg")  # a delete marker
    marker = record(versioned, "ObjectRemoved:DeleteMarkerCreated", "photos/k.jpg", "05", versionId="m1")
    send(sqs, queue_url, marker)
    receive_all(following)
    assert live() == []

    # Every version gone for good, and another key that starts with this one's name: not it.
    s3.put_object(Bucket=versioned, Key="photos/k.jpg.other.jpg", Body=jpeg_with_comment(jpeg(), "other"))
    for version in s3.list_object_versions(Bucket=versioned, Prefix="photos/k.jpg").get("Versions", []):
        if version["Key"] == "photos/k.jpg":
            s3.delete_object(Bucket=versioned, Key="photos/k.jpg", VersionId=version["VersionId"])
    send(sqs, queue_url, record(versioned, "ObjectRemoved:Delete", "photos/k.jpg", "06", versionId=first["VersionId"]))
    receive_all(following)
    assert live() == [] and len(rows(store)) == 2
    assert following.counts.left == 0 and following.counts.malformed == 0


def test_a_versioned_deletion_s3_cannot_be_asked_about_comes_back(store, settings, sqs, bucket, queue_url, monkeypatch):
    """S3 unreachable (or throttling) while the follower asks what is current: that message is left
    on the queue to come back, and the others of the receive are applied."""
    from worker.errors import ThrottledError

    following = follower(store, settings, bucket, queue_url, sqs)
    receive_all(following)

    def throttled(key: str):
        raise ThrottledError(f"s3://{bucket}/{key}: SlowDown")

    monkeypatch.setattr(following, "_current_version", throttled)
    send(sqs, queue_url, record(bucket, "ObjectCreated:Put", "photos/a.jpg", "01", eTag="ea", size=5))
    send(sqs, queue_url, record(bucket, "ObjectRemoved:Delete", "photos/b.jpg", "01", versionId="v1"))
    assert following.receive_once() + following.receive_once() >= 2

    assert [row.key for row in rows(store)] == ["photos/a.jpg"]
    assert following.counts.left == 1 and following.counts.malformed == 0
    assert waiting(sqs, queue_url) == 1, "left to come back (in flight until its visibility timeout)"


def test_followers_of_two_backends_each_apply_their_copy_of_an_event(store, settings, sqs, bucket, queue_url):
    local_queue = sqs.create_queue(QueueName=f"{bucket}-local")["QueueUrl"]
    paid = follower(store, settings, bucket, queue_url, sqs)
    local = follower(store, settings.replace(backend="local"), bucket, local_queue, sqs)
    event = record(bucket, "ObjectCreated:Put", "photos/k.jpg", "01", eTag="e1", size=5)
    for url in (queue_url, local_queue):  # SNS fan-out: one copy for each follower's queue
        send(sqs, url, event)
    receive_all(paid)
    receive_all(local)

    assert sorted((row.backend, row.scan_id) for row in rows(store)) == sorted(
        [("rekognition", paid.scan_id), ("local", local.scan_id)]
    )


def test_a_standing_scans_window_is_made_with_it_and_never_grows(store, settings, sqs, bucket, queue_url):
    """Its slots are rows made with the scan: a follower that could not reach the broker leaves them
    due for the window's keeper, and the followers after it find the same ones."""
    from producer.follow import FOLLOW_WINDOW
    from worker.queue.slots import WindowSlots

    sent: list[int] = []

    def broker_away(scan_id: int) -> None:
        raise ConnectionError("the broker is away")

    with pytest.raises(ConnectionError):
        Follower(store, settings, parse_source(f"s3://{bucket}/photos/"), queue_url, sqs, open_window=broker_away)
    restarted = Follower(
        store, settings, parse_source(f"s3://{bucket}/photos/"), queue_url, sqs, open_window=sent.append
    )
    again = Follower(store, settings, parse_source(f"s3://{bucket}/photos/"), queue_url, sqs, open_window=sent.append)

    assert sent == [restarted.scan_id] * 2 and again.scan_id == restarted.scan_id
    window = WindowSlots(store.engine).states([restarted.scan_id])[restarted.scan_id]
    assert window.size == window.due == min(settings.window, FOLLOW_WINDOW)


def _recognized(store, image_id: int, name: str) -> None:
    from tests.conftest import write_outcomes

    box = BoundingBox(0.1, 0.1, 0.3, 0.3)
    result = RecognitionResult(celebrities=(Celebrity(name=name, id="1", match_confidence=99.0, bounding_box=box),))
    write_outcomes(store, [ImageOutcome.done(image_id, 200, 120, result)])


def test_duplicated_and_reordered_deliveries_keep_the_latest_event_of_each_key(store, settings, sqs, bucket, queue_url):
    following = follower(store, settings, bucket, queue_url, sqs)
    receive_all(following)  # S3's test event
    created_first = record(bucket, "ObjectCreated:Put", "photos/x.jpg", "0055AED6DCD90281E5", eTag="e1", size=10)
    removed = record(bucket, "ObjectRemoved:Delete", "photos/x.jpg", "0055AED6DCD90281E7")
    created_stale = record(bucket, "ObjectCreated:Put", "photos/x.jpg", "0055AED6DCD90281E6", eTag="e2", size=11)
    send(sqs, queue_url, removed)  # the delete arrives first
    send(sqs, queue_url, created_first)
    send(sqs, queue_url, created_stale, removed)  # late, and the delete again
    receive_all(following)

    assert rows(store, key="photos/x.jpg") == [], "every creation was older than the deletion: nothing recorded"
    assert following.counts.stale == 3

    created_later = record(bucket, "ObjectCreated:Put", "photos/x.jpg", "0055AED6DCD90281E8FF", eTag="e3", size=12)
    send(sqs, queue_url, created_later)
    send(sqs, queue_url, created_later)  # delivered twice
    receive_all(following)

    [row] = rows(store, key="photos/x.jpg")
    assert (row.etag, row.size, row.deleted_at) == ("e3", 12, None)
    assert store.summary(following.scan_id).listed == 1, "the repeat counted nothing"


def test_events_of_other_buckets_prefixes_and_non_images_are_ignored_and_deleted(
    store, settings, sqs, bucket, queue_url
):
    following = follower(store, settings, bucket, queue_url, sqs)
    receive_all(following)
    ignored_before = following.counts.ignored
    send(
        sqs,
        queue_url,
        record("another-bucket", "ObjectCreated:Put", "photos/a.jpg", "01", eTag="e", size=1),
        record(bucket, "ObjectCreated:Put", "photo/b.jpg", "01", eTag="e", size=1),
        record(bucket, "ObjectCreated:Put", "photos/c.heic.txt", "01", eTag="e", size=1),
        record(bucket, "ObjectRestore:Completed", "photos/d.jpg", "01"),
    )
    send(sqs, queue_url, record(bucket, "ObjectCreated:Put", "photos/e.png", "01", eTag="e", size=1))
    receive_all(following)

    assert [row.key for row in rows(store)] == ["photos/e.png"]
    assert following.counts.ignored - ignored_before == 3  # the restore is no event for celebscan at all
    assert waiting(sqs, queue_url) == 0


def test_an_unreadable_message_is_logged_in_one_line_and_left_to_the_dead_letter_queue(
    store, settings, sqs, bucket, queue_url, caplog
):
    sqs.set_queue_attributes(QueueUrl=queue_url, Attributes={"VisibilityTimeout": "0"})  # back at once
    dead_letter_url = sqs.get_queue_url(QueueName=queue_url.rsplit("/", 1)[1] + "-dlq")["QueueUrl"]
    following = follower(store, settings, bucket, queue_url, sqs)
    receive_all(following)
    sqs.send_message(QueueUrl=queue_url, MessageBody="{not json")
    sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps({"Records": [{"eventName": "ObjectCreated:Put"}]}))
    creation_without_etag = record(bucket, "ObjectCreated:Put", "photos/y.jpg", "01")
    send(sqs, queue_url, creation_without_etag)
    send(sqs, queue_url, record(bucket, "ObjectCreated:Put", "photos/ok.jpg", "01", eTag="e", size=1))

    with caplog.at_level(logging.WARNING, logger="producer.follow"):
        receive_all(following)

    assert [row.key for row in rows(store)] == ["photos/ok.jpg"], "a good message beside bad ones is applied"
    assert waiting(sqs, queue_url) == 0
    assert waiting(sqs, dead_letter_url) == 3, "after 5 receives each bad message moved to the dead-letter queue"
    assert following.counts.malformed == 3 * 5
    lines = [r.getMessage() for r in caplog.records if "not an S3 event notification" in r.getMessage()]
    assert len(lines) == 15 and all("\n" not in line for line in lines)


def test_followers_on_one_queue_share_one_standing_scan_and_apply_each_event_once(
    store, settings, sqs, bucket, queue_url
):
    first = follower(store, settings, bucket, queue_url, sqs)
    second = follower(store, settings, bucket, queue_url, sqs)
    assert first.scan_id == second.scan_id
    for n in range(60):
        send(sqs, queue_url, record(bucket, "ObjectCreated:Put", f"photos/{n:03d}.jpg", "01", eTag=f"e{n}", size=n))
    threads = [threading.Thread(target=receive_all, args=(each,)) for each in (first, second, first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(rows(store)) == 60 and {row.scan_id for row in rows(store)} == {first.scan_id}
    assert first.counts.queued + second.counts.queued == 60
    assert store.summary(first.scan_id).listed == 60


def test_a_standing_scan_nobody_follows_ends_and_finishes_and_the_next_follower_opens_another(
    store, settings, sqs, bucket, queue_url
):
    from tests.conftest import folder_worker_context
    from worker.recognizers.stub import StubRecognizer

    following = follower(store, settings, bucket, queue_url, sqs)
    scan_id = following.scan_id
    context = folder_worker_context(store, StubRecognizer())
    step = take_next_batch(scan_id, context, "slot-1")
    assert step.next_in is not None and step.next_in <= 2.0, "a followed scan's slot comes back soon"
    assert store.summary(scan_id).finished_at is None

    with store.engine.begin() as conn:  # nobody renewed it for a lease
        conn.execute(scans.update().where(scans.c.id == scan_id).values(followed_at=None))
    step = take_next_batch(scan_id, context, "slot-2")

    assert step.next_in is None and store.summary(scan_id).finished_at is not None
    send(sqs, queue_url, record(bucket, "ObjectCreated:Put", "photos/late.jpg", "01", eTag="e", size=1))
    receive_all(following)
    assert following.scan_id != scan_id
    [row] = rows(store, key="photos/late.jpg")
    assert row.scan_id == following.scan_id and store.summary(following.scan_id).standing
    assert Scans(store.engine).open_standing(f"s3://{bucket}/photos/", "rekognition") == (following.scan_id, False)


def test_follow_without_a_broker_recognizes_uploads_with_a_local_pool(
    store, settings, s3, sqs, bucket, queue_url, rekognition
):
    rekognition.answer = lambda key, data: {"CelebrityFaces": [celebrity("Grace Hopper")], "UnrecognizedFaces": []}
    stop = threading.Event()
    said: list[str] = []
    settings = settings.replace(workers=1)
    source = parse_source(f"s3://{bucket}/photos/")
    thread = threading.Thread(
        target=run_follow, args=(store, settings, source, queue_url, stop, said.append), kwargs={"wait_seconds": 1}
    )
    thread.start()
    try:
        for n in range(5):
            s3.put_object(Bucket=bucket, Key=f"photos/{n}.jpg", Body=jpeg_with_comment(jpeg(), str(n)))
        from tests.servers import wait_until

        wait_until(lambda: len(rows(store, status=DONE)) == 5, timeout=60, what="five uploads recognized")
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive()
    assert [p.name for p in store.people()] == ["Grace Hopper"]
    assert "standing scan" in said[0]


def test_follow_needs_a_bucket_and_a_queue(database_url):
    runner = CliRunner()
    env = {"CELEBSCAN_DATABASE_URL": database_url}
    assert "give SOURCE" in runner.invoke(cli, ["follow"], env=env).output
    assert "give s3://" in runner.invoke(cli, ["follow", "/tmp"], env=env).output
    assert "give --queue" in runner.invoke(cli, ["follow", f"s3://b-{uuid.uuid4().hex[:6]}/"], env=env).output


@pytest.mark.slow
def test_readme_s_follow_path_with_the_procfile_s_events_and_worker_lines(
    aws_env, moto_url, sqs, rekognition, broker_url, postgres_url, s3, bucket, tmp_path
):
    """README's set-up line, then the Procfile's ``events`` and ``worker`` lines as a user starts
    them: uploads recognized, deletions left out of people, an unreadable message left to the
    dead-letter queue, SIGTERM a clean stop, and README's catch-up scan skipping what is done."""
    from tests.conftest import _reset_postgres
    from tests.servers import wait_until
    from tests.test_readme_paths import PROCFILE, README, run_as_user, shell_command, user_env

    _reset_postgres(postgres_url)
    odd = lambda key: key is not None and key[-5] in "13579"  # noqa: E731  # photos/NNN.jpg
    rekognition.answer = lambda key, data: {"CelebrityFaces": [celebrity(f"Person {int(odd(key))}")]}
    env = {
        **user_env(tmp_path, broker_url, postgres_url, aws_env, rekognition.url),
        "AWS_ENDPOINT_URL_SQS": moto_url,
        "AWS_ENDPOINT_URL_STS": moto_url,
    }
    [block] = [block for block in README.split("```sh\n")[1:] if "--setup" in block.split("```")[0]]
    [setup, follow_line, catch_up] = [
        line.split(" #", 1)[0].strip().replace("my-bucket", bucket) for line in block.split("```")[0].splitlines()
    ]
    assert setup.endswith("--setup") and "--queue QUEUE_URL --backend rekognition" in follow_line
    assert catch_up.startswith("celebscan scan") and catch_up.endswith("--backend rekognition")
    said = run_as_user(setup, env, tmp_path).splitlines()
    [queue_url] = [line.split(": ", 1)[1] for line in said if line.startswith("queue: ")]
    again = run_as_user(setup, env, tmp_path)
    assert f"celebscan follow s3://{bucket}/photos/ --queue {queue_url}" in again, "setting up again changes nothing"
    events_env = {
        **env,
        "CELEBSCAN_FOLLOW_SOURCE": f"s3://{bucket}/photos/",
        "CELEBSCAN_EVENTS_QUEUE_URL": queue_url,
        "CELEBSCAN_FOLLOW_BACKEND": "rekognition",
    }
    store = ResultStore.connect(postgres_url)
    events_log = tmp_path / "events.log"
    with (
        shell_command(PROCFILE["worker"], env, tmp_path, tmp_path / "worker.log"),
        shell_command(PROCFILE["events"], events_env, tmp_path, events_log) as events,
    ):
        for n in range(20):
            s3.put_object(Bucket=bucket, Key=f"photos/{n:03d}.jpg", Body=jpeg_with_comment(jpeg(), str(n)))
        sqs.send_message(QueueUrl=queue_url, MessageBody="not an event")
        wait_until(lambda: len(rows(store, status=DONE)) == 20, timeout=180, what="20 uploads recognized")
        assert {p.name: p.images for p in store.people()} == {"Person 0": 10, "Person 1": 10}
        for n in (1, 3, 5):
            s3.delete_object(Bucket=bucket, Key=f"photos/{n:03d}.jpg")
        wait_until(lambda: sum(r.deleted_at is not None for r in rows(store)) == 3, timeout=60, what="3 deletions")
        people = run_as_user("celebscan people", env, tmp_path)
        assert "10  Person 0" in people and " 7  Person 1" in people, people
        events.send_signal(signal.SIGTERM)
        assert events.wait(timeout=60) == 0
    log = events_log.read_text()
    assert "stopped: " in log and "Traceback" not in log, log
    assert sum("not an S3 event notification" in line for line in log.splitlines()) >= 1
    [scan_id] = {row.scan_id for row in rows(store)}
    assert store.summary(scan_id).standing and len(rekognition.calls) == 20

    s3.put_object(Bucket=bucket, Key="photos/before-follow.jpg", Body=jpeg_with_comment(jpeg(), "late"))
    with shell_command(PROCFILE["worker"], env, tmp_path, tmp_path / "worker2.log"):
        output = run_as_user(catch_up, env, tmp_path)
        wait_until(lambda: store.summary(store.latest_scan_id()).finished_at is not None, timeout=180, what="catch-up")
    assert len(rekognition.calls) == 21, f"the catch-up scan paid for the new image only: {output}"
    store.engine.dispose()
