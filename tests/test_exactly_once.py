"""Exactly once where it must be, at least once (bounded) where it cannot be: the six ways the
queue of record used to repeat, strand or lose work, each a test on SQLite and PostgreSQL that
fails on the code before the fix (issue 19). The seeded simulation (``test_simulation.py``)
checks the same guarantees under every interleaving it draws; these pin each scenario down.
"""

from __future__ import annotations

import hashlib
import random
import threading
from collections import Counter

import pytest
from sqlalchemy import select, text, update

from tests.clocks import SteppingClock
from tests.conftest import folder_worker_context, lost_acknowledgements
from tests.imagemaker import jpeg
from tests.simulation.scheduler import Scheduler
from tests.simulation.world import Bucket, Faults, SimS3, picture_bytes
from worker import clock
from worker.batch import process_claimed, take_next_batch
from worker.listing import ListedObject, list_folder
from worker.listing_parts import list_part, s3_pages
from worker.outcomes import ImageOutcome
from worker.queue.images import ImageQueue
from worker.queue.parts import ListingParts
from worker.queue.scans import Scans
from worker.recognition import BoundingBox, Celebrity, RecognitionResult
from worker.recognizers.stub import StubRecognizer
from worker.schema import listing_parts, scans
from worker.tasks import run_window_slot


@pytest.fixture
def stepping():
    with clock.using(SteppingClock()) as stepping_clock:
        yield stepping_clock


def named(*names: str) -> RecognitionResult:
    box = BoundingBox(0.1, 0.1, 0.2, 0.2)
    return RecognitionResult(celebrities=tuple(Celebrity(n, n, 99.0, box) for n in names))


class PaidStub(StubRecognizer):
    """A paid recognizer (its calls count as Rekognition's) that names each picture after its MD5."""

    name = "rekognition"

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__(lambda image: named(hashlib.md5(image.data).hexdigest()[:8]))
        self.by_picture: Counter = Counter()
        self.delay = delay
        self._lock = threading.Lock()

    def recognize(self, image, location=None):
        with self._lock:
            self.by_picture[hashlib.md5(image.data).hexdigest()] += 1
        if self.delay:
            threading.Event().wait(self.delay)
        return super().recognize(image, location)


def photo_folder(tmp_path, pictures: int, folders=("",)):
    folder = tmp_path / "photos"
    for folder_name in folders:
        (folder / folder_name).mkdir(parents=True, exist_ok=True)
        for number in range(pictures):
            (folder / folder_name / f"{number:03d}.jpg").write_bytes(jpeg(200 + number, 150))
    return folder


def scanned_folder(store, tmp_path, pictures: int):
    """A folder of distinct pictures listed into a new scan, and a worker context that recognizes
    them with a paid stub: (the folder, the stub, the context, the scan id)."""
    folder = photo_folder(tmp_path, pictures)
    stub = PaidStub()
    scan_id = store.create_scan(str(folder), "rekognition")
    store.queue_images(scan_id, str(folder), "rekognition", list_folder(folder))
    return folder, stub, folder_worker_context(store, stub), scan_id


def figures_add_up(summary) -> bool:
    """listed = skipped + held elsewhere + the scan's images + handed over to later scans."""
    images_in_scan = sum(summary.counts.values())
    return summary.listed == summary.skipped + summary.held_elsewhere + images_in_scan + summary.handed_over


# 1. A write from a run that lost its claim is refused, and the call it paid for still counted.


def test_a_late_write_from_a_run_that_lost_its_claim_is_refused_and_its_call_still_counted(store, stepping):
    scan_id = store.create_scan("/photos", "rekognition")
    [image_id] = store.queue_images(scan_id, "/photos", "rekognition", [ListedObject("a.jpg", "e", 100)]).image_ids
    images = ImageQueue(store.engine, lease_seconds=60)
    assert images.claim(scan_id, 16, "run-a") == [image_id]
    [as_a_saw_it] = images.start("run-a", images.held("run-a", [image_id]), 3).images
    stepping.advance(61)  # run A stalls past its lease; nobody renewed it
    assert images.claim(scan_id, 16, "run-b") == [image_id], "its lease ran out: another run takes it"
    images.start("run-b", images.held("run-b", [image_id]), 3)
    assert images.write("run-b", [ImageOutcome.done(image_id, 64, 48, named("B"), paid_calls=1)]).written == {image_id}
    Scans(store.engine).finish_if_drained([scan_id])

    late_done = images.write("run-a", [ImageOutcome.done(image_id, 64, 48, named("A"), paid_calls=1)])
    retry_later = ImageOutcome.deferred_for(
        as_a_saw_it, "ThrottlingException", "slow down", retries=5, retry_since=stepping.now()
    )
    late_deferral = images.write("run-a/1", [retry_later])  # another batch of run A, that lost it too
    assert late_done.refused == {image_id} and not late_done.written
    assert not late_deferral.written and not late_deferral.refused, "a deferral that lost its claim changes nothing"

    summary = store.summary(scan_id)
    assert summary.counts == {"queued": 0, "done": 1, "failed": 0} and summary.finished_at is not None
    assert [record.names for record in store.result_records(scan_id)] == [["B"]]
    assert summary.paid_calls == 2, "both calls were paid for"
    assert summary.refused_writes == 1 and store.refused_writes() == 1


def test_metrics_count_the_stale_writes_refused(store, stepping):
    from producer.metrics import plain_text, prometheus_text, take_reading
    from worker.settings import Settings

    scan_id = store.create_scan("/photos", "rekognition")
    [image_id] = store.queue_images(scan_id, "/photos", "rekognition", [ListedObject("a.jpg", "e", 100)]).image_ids
    images = ImageQueue(store.engine, lease_seconds=60)
    images.claim(scan_id, 16, "run-a")
    stepping.advance(61)
    images.claim(scan_id, 16, "run-b")
    images.write("run-b", [ImageOutcome.done(image_id, 64, 48, named("B"))])
    images.write("run-a", [ImageOutcome.done(image_id, 64, 48, named("A"), paid_calls=1)])
    reading = take_reading(store, Settings(database_url=str(store.engine.url)))
    assert reading.refused_writes == 1
    assert "stale writes refused: 1" in plain_text(reading)
    assert "celebscan_stale_writes_refused_total 1" in prometheus_text(reading)


# 2. A second scan of a source still being scanned never takes the first scan's images in flight.


def test_a_second_scan_leaves_images_in_flight_to_the_first_and_both_finish(store, tmp_path):
    folder, stub, context, first = scanned_folder(store, tmp_path, 6)
    in_flight = context.images.claim(first, 3, "run-of-scan-1")
    assert len(in_flight) == 3

    second = store.create_scan(str(folder), "rekognition")
    report = store.queue_images(second, str(folder), "rekognition", list_folder(folder))
    assert (report.listed, report.held_elsewhere, len(report.image_ids)) == (6, 3, 3), (
        "the three held are left to scan 1; the three nobody held move to scan 2"
    )
    assert not set(report.image_ids) & set(in_flight)

    process_claimed(in_flight, context, "run-of-scan-1")
    while take_next_batch(second, context, "run-of-scan-2").next_in is not None:
        pass
    assert sum(stub.by_picture.values()) == 6 and set(stub.by_picture.values()) == {1}, "each recognized once"
    one, two = store.summary(first), store.summary(second)
    assert one.finished_at is not None and two.finished_at is not None
    assert (one.counts["done"], one.handed_over) == (3, 3) and (two.counts["done"], two.held_elsewhere) == (3, 3)
    assert figures_add_up(one) and figures_add_up(two)


def test_resume_while_runs_are_alive_takes_no_claim_they_hold(store, tmp_path):
    """``scan --resume`` run twice while a run works: nothing it holds is handed out again."""
    from producer.scan import ScanRequest, Services, run_scan
    from worker.settings import Settings

    _, stub, context, scan_id = scanned_folder(store, tmp_path, 6)
    held = context.images.claim(scan_id, 3, "live-run")
    windows = []
    services = Services(
        s3=lambda: None, open_window=lambda scan, parts: windows.append(scan), check_broker=lambda: None
    )
    settings = Settings(database_url=str(store.engine.url), broker_url="redis://not-used", backend="rekognition")
    for _ in range(2):
        run_scan(store, settings, ScanRequest(resume_id=scan_id), say=lambda line: None, services=services)
    assert windows == [scan_id, scan_id], "each resume opened a window"
    others = context.images.claim(scan_id, 16, "run-after-resume")
    assert len(others) == 3 and not set(others) & set(held)
    process_claimed(held, context, "live-run")
    process_claimed(others, context, "run-after-resume")
    assert sum(stub.by_picture.values()) == 6
    assert store.summary(scan_id).finished_at is not None


# 3. A listing ends in the same transaction as its last part: no crash leaves it open.


class KilledAfterCommit(BaseException):
    """The process dies right after a commit (nothing after it runs)."""


def test_a_lister_killed_right_after_its_last_page_leaves_the_listing_ended(store):
    bucket = Bucket()
    for number in range(8):
        bucket.put(f"{'ab'[number % 2]}/{number}.png", picture_bytes(number))
    s3 = SimS3(bucket, Scheduler(random.Random(0)), random.Random(0), Faults(active=False), page_cap=100)
    scan_id = store.create_scan("s3://sim/", "rekognition")
    parts = ListingParts(store.engine)
    with store.engine.begin() as conn:
        part_a, part_b = parts.create(conn, scan_id, ["a/", "b/"])
    assert list_part(part_a, parts, s3_pages(s3), "lister-1", steal_seconds=0).next_in is None
    dialect, commits = store.engine.dialect, []
    commit = dialect.do_commit

    def die_after_the_page(dbapi_connection):
        commit(dbapi_connection)
        commits.append(1)
        if len(commits) == 2:  # the claim, then the part's last page
            raise KilledAfterCommit()

    dialect.do_commit = die_after_the_page
    try:
        with pytest.raises(KilledAfterCommit):
            list_part(part_b, parts, s3_pages(s3), "lister-2")
    finally:
        del dialect.do_commit
    summary = store.summary(scan_id)
    assert summary.listing == "listed" and summary.listed == 8, "the last page ended the listing with it"


def test_resume_repairs_a_listing_or_a_scan_left_open(store):
    """Whatever an earlier version (or a crash of one) left: ``scan --resume`` sets it right, and
    running it again changes nothing."""
    scans_ = Scans(store.engine)
    scan_id = store.create_scan("s3://sim/", "rekognition")
    with store.engine.begin() as conn:
        [part] = ListingParts(store.engine).create(conn, scan_id, [""])
        conn.execute(update(listing_parts).where(listing_parts.c.id == part).values(status="done"))
    repair = scans_.repair(scan_id)
    assert repair.listing_ended and repair.finished
    assert scans_.repair(scan_id) == type(repair)(), "a second repair finds nothing to do"
    with store.engine.connect() as conn:
        assert conn.execute(select(scans.c.listing_finished_at, scans.c.finished_at)).one()[1] is not None


# 4. A run that ends with an error gives its claims back at once and its slot goes on after a pause.


def test_a_run_that_ends_with_an_error_releases_its_claims_and_its_slot_goes_on(store, tmp_path, monkeypatch, stepping):
    folder = photo_folder(tmp_path, 3)
    stub = PaidStub()
    context = folder_worker_context(store, stub)
    scan_id = store.create_scan(str(folder), "rekognition", window=1)
    ids = store.queue_images(scan_id, str(folder), "rekognition", list_folder(folder)).image_ids
    write, sent = ImageQueue.write, []

    def send(messages):
        sent.extend(messages)
        return []

    def broken_write(self, token, outcomes):
        raise RuntimeError("a bug in the write")

    monkeypatch.setattr(ImageQueue, "write", broken_write)
    [message] = context.slots.dispatch()
    run_window_slot(message, context, "run-1", send)
    window = context.slots.states([scan_id])[scan_id]
    assert (window.due, window.size) == (1, 1), "the slot waits for a pause, so the window never shrinks"
    queued = store.images.queued(ids)
    assert [(image.attempts, image.started_by) for image in queued] == [(0, None)] * 3, "claims and starts given back"
    monkeypatch.setattr(ImageQueue, "write", write)
    assert context.slots.dispatch() == [], "not before its pause is over"
    stepping.advance(1.0)
    [after_the_pause] = context.slots.dispatch()
    assert after_the_pause.generation == message.generation + 1
    assert run_window_slot(message, context, "late", send).done == 0, "the old message does nothing"
    run_window_slot(after_the_pause, context, "run-2", send)
    assert store.summary(scan_id).counts["done"] == 3, "the next run claims them at once (no lease to wait out)"
    assert [each.generation for each in sent] == [after_the_pause.generation + 1], "and sends the slot on"


def test_every_run_of_a_message_claims_with_a_token_of_its_own():
    from types import SimpleNamespace

    from worker.celery_app import _run_token

    request = SimpleNamespace(id="3f2b-message", retries=0)
    first, again = _run_token(request), _run_token(request)
    assert first != again and first.startswith("3f2b-message:") and len(first) <= 100


# 5. A listing page whose commit's acknowledgement was lost is replayed and counts once.


def test_a_listing_page_replayed_after_a_lost_acknowledgement_counts_once(store, no_backoff):
    bucket = Bucket()
    for number in range(6):
        bucket.put(f"{number}.png", picture_bytes(number))
    s3 = SimS3(bucket, Scheduler(random.Random(0)), random.Random(0), Faults(active=False), page_cap=100)
    scan_id = store.create_scan("s3://sim/", "rekognition")
    parts = ListingParts(store.engine)
    with store.engine.begin() as conn:
        [part_id] = parts.create(conn, scan_id, [""])
    part = parts.claim(part_id, "lister")
    page = next(s3_pages(s3)(part))
    with lost_acknowledgements(store.engine) as left:
        recorded = parts.record_page(part, page.objects, page.last_key, page.ended)
    assert left == [0] and recorded is not None and recorded.last_key == "5.png"
    summary = store.summary(scan_id)
    assert (summary.listed, sum(summary.counts.values()), summary.listing) == (6, 6, "listed")


# 6. Copies of a picture in flight are paid for once.


def test_copies_of_a_picture_in_flight_in_two_workers_are_paid_for_once(store, tmp_path):
    """12 pictures, each under 2024/, backup/2024/, shared/alice/ and shared/bob/: two workers
    take batches side by side; a copy whose picture the other is recognizing waits for it."""
    folder = photo_folder(tmp_path, 12, folders=("2024", "backup/2024", "shared/alice", "shared/bob"))
    stub = PaidStub(delay=0.05)
    scan_id = store.create_scan(str(folder), "rekognition")
    store.queue_images(scan_id, str(folder), "rekognition", list_folder(folder))
    store.engine.dispose()
    errors: list[BaseException] = []

    def worker(number: int) -> None:
        context = folder_worker_context(store, stub)
        context.batch_size = 4
        turn = 0
        try:
            while True:
                step = take_next_batch(scan_id, context, f"worker-{number}:{turn}", max_idle=0.2)
                turn += 1
                if step.next_in is None:
                    return
                threading.Event().wait(step.next_in)
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    workers = [threading.Thread(target=worker, args=(number,)) for number in range(2)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(timeout=300)
    assert not errors, errors
    summary = store.summary(scan_id)
    print(f"\n48 images of 12 pictures on two workers: {sum(stub.by_picture.values())} paid calls")
    assert summary.counts == {"queued": 0, "done": 48, "failed": 0} and summary.finished_at is not None
    assert sum(stub.by_picture.values()) == 12 == len(stub.by_picture), stub.by_picture
    assert summary.paid_calls == 12 and summary.reused == 36
    with store.engine.connect() as conn:
        names = conn.execute(
            text("SELECT i.content_hash, f.name FROM images i JOIN faces f ON f.image_id = i.id")
        ).all()
    assert len(names) == 48 and all(name == content_hash[:8] for content_hash, name in names)


# The same two scenarios end to end: moto's S3, the Rekognition stand-in, real Redis and
# PostgreSQL, and two worker processes started as the Procfile says.


@pytest.fixture
def procfile_scan(aws_env, rekognition, broker_url, postgres_url, s3, bucket, tmp_path):
    from tests.conftest import _reset_postgres, rekognition_scan_env
    from tests.rekognition_standin import celebrity
    from worker.store import ResultStore

    _reset_postgres(postgres_url)
    rekognition.answer = lambda key, data: {"CelebrityFaces": [celebrity(hashlib.md5(data).hexdigest()[:8])]}
    rekognition.delay = 0.2  # a call takes a while: copies are in flight together
    env = rekognition_scan_env(aws_env, rekognition, broker_url, postgres_url)
    store = ResultStore.connect(postgres_url)
    yield store, env
    store.engine.dispose()


def _procfile_workers(env, logs):
    from tests.celery_workers import celery_workers

    return celery_workers(1, {**env, "CELEBSCAN_WORKER_CONCURRENCY": "2"}, logs, concurrency=2)


@pytest.mark.slow
def test_copies_in_flight_on_procfile_workers_are_paid_for_once(procfile_scan, rekognition, s3, bucket, tmp_path):
    from tests.celery_workers import wait_for_scan
    from tests.clirun import celebscan

    store, env = procfile_scan
    for folder in ("2024/", "backup/2024/", "shared/alice/", "shared/bob/"):
        for number in range(12):
            s3.put_object(Bucket=bucket, Key=f"{folder}{number:03d}.jpg", Body=jpeg(200 + number, 150))
    with _procfile_workers(env, tmp_path):
        celebscan("scan", f"s3://{bucket}/", env=env)
        scan_id = store.latest_scan_id()
        wait_for_scan(store, scan_id, timeout=300)
    summary = store.summary(scan_id)
    calls = Counter(call.digest for call in rekognition.calls if call.answered == "ok")
    print(f"\n48 images of 12 pictures, 2 Procfile worker processes: {sum(calls.values())} paid calls")
    assert summary.counts == {"queued": 0, "done": 48, "failed": 0}
    assert sum(calls.values()) == 12 == len(calls) and summary.paid_calls == 12


@pytest.mark.slow
def test_a_second_scan_started_while_the_first_runs_on_procfile_workers(
    procfile_scan, rekognition, s3, bucket, tmp_path
):
    """The second scan 3 s after the first, 60 pictures: both finish, each picture paid once."""
    from tests.celery_workers import wait_for_scan
    from tests.clirun import celebscan
    from tests.servers import wait_until

    store, env = procfile_scan
    for number in range(60):
        s3.put_object(Bucket=bucket, Key=f"f/{number:03d}.jpg", Body=jpeg(200 + number, 150))
    with _procfile_workers(env, tmp_path):
        celebscan("scan", f"s3://{bucket}/f/", env=env)
        first = store.latest_scan_id()
        wait_until(lambda: store.summary(first).processed >= 4, timeout=120, what="the first images")
        second_output = celebscan("scan", f"s3://{bucket}/f/", env=env).output
        second = store.latest_scan_id()
        wait_for_scan(store, first, timeout=300)
        wait_for_scan(store, second, timeout=300)
    one, two = store.summary(first), store.summary(second)
    calls = Counter(call.digest for call in rekognition.calls if call.answered == "ok")
    print(
        f"\nfirst scan: {one.counts}, handed over {one.handed_over}; second: {two.counts}, "
        f"skipped {two.skipped}, left to the first {two.held_elsewhere}; paid calls {sum(calls.values())}"
    )
    assert "listed 60 images" in second_output
    assert one.finished_at is not None and two.finished_at is not None
    assert figures_add_up(one) and figures_add_up(two)
    assert one.counts["done"] + two.counts["done"] == 60
    assert sum(calls.values()) == 60 == len(calls), "each picture paid for once"


def test_status_says_when_a_folder_listing_stopped_and_resume_continues_it(store, tmp_path, stepping):
    """A folder is listed by the scan command alone: when it was killed mid-listing, ``status`` says
    so and names the ``--resume`` that lists the rest."""
    from producer.cli import format_summary
    from worker.settings import Settings

    folder = photo_folder(tmp_path, 3)
    scan_id = store.create_scan(str(folder), "local")
    with store.engine.begin() as conn:
        [part_id] = ListingParts(store.engine).create(conn, scan_id, [""])
    ListingParts(store.engine).claim(part_id, "scan-1:killed")  # then the scan command died
    settings = Settings(database_url=str(store.engine.url))
    assert "stopped" not in format_summary(store.summary(scan_id), settings), "a live listing is not reported"
    stepping.advance(settings.lease_seconds + 1)
    status = format_summary(store.summary(scan_id), settings)
    assert f"the listing of {folder} stopped" in status and f"celebscan scan --resume {scan_id}" in status


def test_resume_leaves_a_listing_to_the_live_scan_command_and_takes_it_over_once_it_died(store, stepping):
    """The scan's source is one part the scan command holds from the scan's creation on: a
    ``--resume`` while it still splits the key space leaves it alone; once its lease ran out, a
    ``--resume`` splits the key space itself and hands the parts to the workers, and nothing is
    listed twice."""
    from producer.scan import ScanRequest, Services, run_scan
    from worker.settings import Settings

    bucket = Bucket()
    for number in range(30):
        bucket.put(f"{'abc'[number % 3]}/{number:02d}.png", picture_bytes(number))
    s3 = SimS3(bucket, Scheduler(random.Random(0)), random.Random(0), Faults(active=False), page_cap=4)
    windows: list[tuple[int, int]] = []
    services = Services(
        s3=lambda: s3, open_window=lambda scan, parts: windows.append((scan, len(parts))), check_broker=lambda: None
    )
    settings = Settings(database_url=str(store.engine.url), broker_url="redis://not-used", backend="rekognition")
    scan_id = Scans(store.engine).create("s3://sim/", "rekognition")
    with store.engine.begin() as conn:  # as `scan` leaves it when it dies before splitting
        ListingParts(store.engine).create(conn, scan_id, [""], claimed_by="scan:died")
    run_scan(store, settings, ScanRequest(resume_id=scan_id), say=lambda line: None, services=services)
    assert windows == [(scan_id, 0)] and ListingParts(store.engine).progress(scan_id).total == 1, "left to it"
    stepping.advance(settings.lease_seconds + 1)
    lines: list[str] = []
    run_scan(store, settings, ScanRequest(resume_id=scan_id), say=lines.append, services=services)
    parts = ListingParts(store.engine).unfinished(scan_id)
    assert windows[-1] == (scan_id, len(parts)) and len(parts) > 1, lines
    for part_id in parts:
        list_part(part_id, ListingParts(store.engine), s3_pages(s3), "worker", slice_seconds=600)
    summary = store.summary(scan_id)
    assert (summary.listing, summary.listed, sum(summary.counts.values())) == ("listed", 30, 30)
