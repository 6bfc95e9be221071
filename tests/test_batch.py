"""The batch function with a stub recognizer: retries, failures, redelivery, quarantine."""

import pytest

from tests.conftest import folder_worker_context
from tests.imagemaker import jpeg
from worker.batch import MAX_DELIVERIES, WorkerContext, process_batch
from worker.errors import AccessDeniedError, ThrottledError
from worker.listing import list_folder
from worker.recognition import BoundingBox, Celebrity, RecognitionResult
from worker.recognizers.stub import StubRecognizer
from worker.store import ResultStore

FOUND = RecognitionResult(celebrities=(Celebrity("obama", "1", 95.0, BoundingBox(0.1, 0.1, 0.2, 0.2)),))


@pytest.fixture
def folder(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for number, name in enumerate(("a.jpg", "b.jpg", "c.jpg")):
        (photos / name).write_bytes(jpeg(200 + number, 150))  # three different pictures
    return photos


def queued(store, folder):
    scan_id = store.create_scan(str(folder), "stub")
    return store.queue_images(scan_id, str(folder), "stub", list_folder(folder)).image_ids


context = folder_worker_context


def by_key(store):
    return {r.key: r for r in store.result_records()}


def test_every_image_gets_a_result(store, folder):
    ids = queued(store, folder)
    report = process_batch(ids, context(store, StubRecognizer(lambda image: FOUND)))
    assert (report.done, report.failed) == (3, 0)
    assert {k: r.celebrities[0].name for k, r in by_key(store).items()} == dict.fromkeys(
        ["a.jpg", "b.jpg", "c.jpg"], "obama"
    )


def test_transient_errors_are_retried_until_they_pass(store, folder):
    failures = iter([ThrottledError("slow down")] * 3)

    def answer(image):
        error = next(failures, None)
        if error:
            raise error
        return FOUND

    stub = StubRecognizer(answer)
    process_batch(queued(store, folder), context(store, stub))
    assert stub.calls == 3 + 3
    assert {r.status for r in by_key(store).values()} == {"done"}


def test_transient_errors_that_outlast_the_retries_leave_the_images_queued_until_the_deadline(store, folder):
    def answer(image):
        raise ThrottledError("still throttled")

    stub = StubRecognizer(answer)
    ids = queued(store, folder)
    ctx = context(store, stub)
    for round in range(1, MAX_DELIVERIES + 2):  # more rounds than a poison image is allowed
        report = process_batch(ids, ctx)
        assert (report.done, report.failed, report.deferred) == (0, 0, tuple(ids))
        assert 0 < report.resend_after <= 300
        assert stub.calls == 3 * 4 * round
        pending = store.images.queued(ids)
        assert [(image.attempts, image.retries) for image in pending] == [(0, 4 * round)] * 3, (
            "a deferral is not a delivery that may have crashed a worker"
        )
    summary = store.scan_summary(pending[0].scan_id)
    assert summary.retrying == {"ThrottlingException": 3} and summary.failures == {}
    assert summary.finished_at is None

    ctx.retry_deadline = 0  # the deadline has passed
    report = process_batch(ids, ctx)
    assert (report.failed, report.deferred) == (3, ())
    errors = [r.error for r in by_key(store).values()]
    assert {e.code for e in errors} == {"ThrottlingException"}
    rounds = MAX_DELIVERIES + 2
    assert all(e.message.startswith(f"gave up after {4 * rounds} tries over ") for e in errors), errors
    assert store.scan_summary(pending[0].scan_id).finished_at is not None


def test_resend_delays_grow_with_the_rounds_and_stay_short_of_the_deadline(store):
    from worker.batch import _resend_delay

    ctx = context(store, StubRecognizer())
    ceilings = [max(_resend_delay(rounds, ctx) for _ in range(200)) for rounds in (1, 2, 3, 12)]
    assert ceilings[0] <= 5 < ceilings[1] <= 10 < ceilings[2] <= 20 and 150 <= ceilings[3] <= 300
    ctx.retry_deadline = 20
    assert max(_resend_delay(12, ctx) for _ in range(200)) <= 5


def test_permanent_errors_are_not_retried(store, folder):
    def answer(image):
        raise AccessDeniedError("no")

    stub = StubRecognizer(answer)
    process_batch(queued(store, folder), context(store, stub))
    assert stub.calls == 3
    assert {r.error.code for r in by_key(store).values()} == {"AccessDenied"}


def test_an_unexpected_error_fails_one_image_and_the_batch_goes_on(store, folder):
    def answer(image):
        if answer.calls == 1:
            answer.calls += 1
            raise ZeroDivisionError("bug")
        answer.calls += 1
        return FOUND

    answer.calls = 1
    process_batch(queued(store, folder), context(store, StubRecognizer(answer)))
    statuses = sorted((r.status, getattr(r.error, "code", None)) for r in by_key(store).values())
    assert statuses == [("done", None), ("done", None), ("failed", "InternalError")]


def test_bad_files_and_vanished_files_fail_with_codes(store, folder):
    (folder / "notes.jpg").write_bytes(b"these are my notes")
    (folder / "tiny.jpg").write_bytes(jpeg(40, 40))
    ids = queued(store, folder)
    (folder / "c.jpg").unlink()
    process_batch(ids, context(store, StubRecognizer(lambda image: FOUND)))
    codes = {k: getattr(r.error, "code", None) for k, r in by_key(store).items()}
    assert codes == {
        "a.jpg": None,
        "b.jpg": None,
        "c.jpg": "ObjectNotFound",
        "notes.jpg": "InvalidImageFormat",
        "tiny.jpg": "ImageTooSmall",
    }


def test_a_redelivered_batch_only_does_what_is_left(store, folder):
    ids = queued(store, folder)
    stub = StubRecognizer(lambda image: FOUND)
    process_batch(ids[:1], context(store, stub))
    report = process_batch(ids, context(store, stub))
    assert stub.calls == 3 and report.skipped == 1


def test_an_image_that_keeps_killing_workers_is_quarantined(store, folder):
    ids = queued(store, folder)
    poison_id = ids[0]

    class WorkerKilled(BaseException):
        """Stands in for the process dying: nothing after it in the batch runs or is saved."""

    def answer(image):
        if image.data == poison_bytes:
            raise WorkerKilled()
        return FOUND

    poison_bytes = (folder / "a.jpg").read_bytes()

    def killed_worker_context():
        ctx = context(store, StubRecognizer(answer))
        ctx.lease_seconds = 0  # the killed run's claims are free at once (a new worker claims them)
        return ctx

    for _ in range(MAX_DELIVERIES):
        with pytest.raises(WorkerKilled):
            process_batch(ids, killed_worker_context())
    process_batch(ids, killed_worker_context())
    records = by_key(store)
    assert records["a.jpg"].error.code == "Quarantined"
    assert records["b.jpg"].status == records["c.jpg"].status == "done"
    assert poison_id == min(ids)


def test_context_from_settings_builds_each_recognizer_when_a_batch_first_needs_it(sqlite_url, aws_env):
    from worker.settings import Settings

    ctx = WorkerContext.from_settings(Settings(database_url=sqlite_url))
    local = ctx.recognizers.get("local")
    assert local.name == "local" and len(local.gallery) == 0
    assert ctx.recognizers.get("local") is local, "built once per process"
    assert ctx.recognizers.get("rekognition").name == "rekognition", "the same worker serves the paid backend"
    assert isinstance(ctx.store, ResultStore)


def test_a_batch_this_worker_cannot_serve_is_handed_back_untouched(store, folder):
    """Which worker picked a batch up never decides its images' fate: nothing is read, started or failed."""
    from worker.errors import RecognizerUnavailableError

    scan_id = store.create_scan(str(folder), "rekognition")
    ids = store.queue_images(scan_id, str(folder), "rekognition", list_folder(folder)).image_ids
    stub = StubRecognizer(lambda image: FOUND)
    with pytest.raises(RecognizerUnavailableError, match="rekognition"):
        process_batch(ids, context(store, stub))
    assert stub.calls == 0
    assert {(r.status, r.error) for r in by_key(store).values()} == {("queued", None)}
    assert [image.attempts for image in store.images.queued(ids)] == [0, 0, 0]
    assert store.images.claim_ids(ids, "another-worker") == ids, "handed back: another worker claims them at once"


def test_runs_that_ended_with_a_database_error_do_not_push_images_toward_quarantine(store, folder, monkeypatch):
    """A run that ends with an error (the database away at its write) gives its claims and its
    starts back: only a run that never ended (a crash) counts toward quarantine, and another run
    claims the images at once."""
    from sqlalchemy.exc import OperationalError

    from worker.queue.images import ImageQueue

    ids = queued(store, folder)

    def database_away(self, token, outcomes):
        raise OperationalError("UPDATE images", {}, Exception("server closed the connection"))

    with monkeypatch.context() as patched:
        patched.setattr(ImageQueue, "write", database_away)
        for _ in range(MAX_DELIVERIES + 2):
            with pytest.raises(OperationalError):
                process_batch(ids, context(store, StubRecognizer(lambda image: FOUND)))
            assert [(image.attempts, image.started_by) for image in store.images.queued(ids)] == [(0, None)] * 3
    process_batch(ids, context(store, StubRecognizer(lambda image: FOUND)))
    assert {r.status for r in by_key(store).values()} == {"done"}


def test_a_write_replayed_after_its_acknowledgement_was_lost_counts_once(store, folder, no_backoff):
    """The write's commit reaches the database but its answer is lost: the retried write finds the
    images written by its own run, and changes (and counts) nothing again."""
    from tests.conftest import lost_acknowledgements
    from worker.queue.images import ImageQueue

    scan_id = store.create_scan(str(folder), "rekognition")
    ids = store.queue_images(scan_id, str(folder), "rekognition", list_folder(folder)).image_ids
    stub = StubRecognizer(lambda image: FOUND)
    stub.name = "rekognition"  # a paid backend: each call counts
    ctx = context(store, stub)
    write = ImageQueue.write

    def write_losing_its_answer(self, token, outcomes):
        with lost_acknowledgements(store.engine) as left:
            written = write(self, token, outcomes)
        assert left == [0], "the write's commit lost its answer once"
        return written

    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(ImageQueue, "write", write_losing_its_answer)
        report = process_batch(ids, ctx)
    assert (report.done, report.refused) == (3, 0)
    summary = store.scan_summary(scan_id)
    assert summary.paid_calls == stub.calls == 3 and summary.refused_writes == 0
    assert summary.faces == 3 and summary.finished_at is not None


def test_listing_a_folder_reads_no_file_and_the_worker_records_each_files_hash(store, folder, monkeypatch):
    import hashlib
    import pathlib

    def no_reading(*args, **kwargs):
        raise AssertionError("listing read a file")

    with monkeypatch.context() as patched:
        patched.setattr(pathlib.Path, "open", no_reading)
        patched.setattr(pathlib.Path, "read_bytes", no_reading)
        ids = queued(store, folder)
    before = {image.key: image.etag for image in store.images.queued(ids)}
    assert before["a.jpg"] == f"{(folder / 'a.jpg').stat().st_size}-{(folder / 'a.jpg').stat().st_mtime_ns}"
    process_batch(ids, context(store, StubRecognizer(lambda image: FOUND)))
    from sqlalchemy import select

    from worker.schema import images

    with store.engine.connect() as conn:
        hashes = dict(conn.execute(select(images.c.key, images.c.content_hash)).all())
    assert hashes == {name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in hashes}
    assert len(hashes) == 3


def test_a_turn_after_days_of_idle_rounds_still_waits_its_most(store, folder):
    """A followed source with no uploads counts idle rounds for as long as it waits: 2 ** 1024 must
    not overflow (it stopped an embedded follower after ~8.5 minutes of quiet)."""
    from worker.batch import take_next_batch
    from worker.queue.images import ImageQueue

    scan_id = store.create_scan(str(folder), "stub")
    store.queue_images(scan_id, str(folder), "stub", list_folder(folder))
    assert ImageQueue(store.engine, lease_seconds=60).claim(scan_id, 16, "another-run")  # held: worth waiting for
    step = take_next_batch(scan_id, context(store, StubRecognizer()), "this-run", idle_rounds=5000, max_idle=2.0)
    assert step.next_in == 2.0 and step.idle_rounds == 5001


def test_ctrl_c_in_a_run_gives_its_images_back_at_once(store, folder):
    """Ctrl-C (or an embedded scan's SIGTERM) reaches the run as KeyboardInterrupt: its claims are
    released, so that ``scan --resume`` takes them now rather than after the lease. (A SIGKILL, which
    the simulation and the kill tests raise as a BaseException of their own, releases nothing.)"""
    from sqlalchemy import select

    from worker.batch import take_next_batch
    from worker.schema import images

    def interrupted(image):
        raise KeyboardInterrupt

    scan_id = store.create_scan(str(folder), "stub")
    store.queue_images(scan_id, str(folder), "stub", list_folder(folder))
    with pytest.raises(KeyboardInterrupt):
        take_next_batch(scan_id, context(store, StubRecognizer(interrupted)), "run-1")
    with store.engine.connect() as conn:
        holders = conn.execute(select(images.c.claimed_by).where(images.c.scan_id == scan_id)).scalars().all()
    assert holders == [None, None, None]
