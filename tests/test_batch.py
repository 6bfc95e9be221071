"""The batch function with a stub recognizer: retries, failures, redelivery, quarantine."""

import pytest

from producer.listing import list_folder
from tests.imagemaker import jpeg
from worker.batch import MAX_DELIVERIES, WorkerContext, process_batch
from worker.errors import AccessDeniedError, ThrottledError
from worker.images import ImageLimits
from worker.recognizers.stub import StubRecognizer
from worker.results import BoundingBox, Celebrity, RecognitionResult
from worker.sources import FolderReader
from worker.store import ResultStore

FOUND = RecognitionResult(celebrities=(Celebrity("obama", "1", 95.0, BoundingBox(0.1, 0.1, 0.2, 0.2)),))


@pytest.fixture
def folder(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (photos / name).write_bytes(jpeg())
    return photos


def queued(store, folder):
    scan_id = store.create_scan(str(folder), "stub")
    return store.queue_images(scan_id, str(folder), "stub", list_folder(folder)).image_ids


def context(store, recognizer):
    return WorkerContext(store=store, readers={"folder": FolderReader(10**8)}, recognizer=recognizer,
                         limits=ImageLimits(), max_attempts=4, retry_base_seconds=0.001)


def by_key(store):
    return {r["key"]: r for r in store.result_records()}


def test_every_image_gets_a_result(store, folder):
    ids = queued(store, folder)
    report = process_batch(ids, context(store, StubRecognizer(lambda image: FOUND)))
    assert (report.done, report.failed) == (3, 0)
    assert {k: r["celebrities"][0]["name"] for k, r in by_key(store).items()} == dict.fromkeys(["a.jpg", "b.jpg", "c.jpg"], "obama")


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
    assert {r["status"] for r in by_key(store).values()} == {"done"}


def test_transient_errors_that_never_pass_fail_the_image_with_their_code(store, folder):
    def answer(image):
        raise ThrottledError("still throttled")

    stub = StubRecognizer(answer)
    report = process_batch(queued(store, folder), context(store, stub))
    assert report.failed == 3 and stub.calls == 3 * 4
    assert {r["error"]["code"] for r in by_key(store).values()} == {"ThrottlingException"}


def test_permanent_errors_are_not_retried(store, folder):
    def answer(image):
        raise AccessDeniedError("no")

    stub = StubRecognizer(answer)
    process_batch(queued(store, folder), context(store, stub))
    assert stub.calls == 3
    assert {r["error"]["code"] for r in by_key(store).values()} == {"AccessDenied"}


def test_an_unexpected_error_fails_one_image_and_the_batch_goes_on(store, folder):
    def answer(image):
        if answer.calls == 1:
            answer.calls += 1
            raise ZeroDivisionError("bug")
        answer.calls += 1
        return FOUND

    answer.calls = 1
    process_batch(queued(store, folder), context(store, StubRecognizer(answer)))
    statuses = sorted((r["status"], (r["error"] or {}).get("code")) for r in by_key(store).values())
    assert statuses == [("done", None), ("done", None), ("failed", "InternalError")]


def test_bad_files_and_vanished_files_fail_with_codes(store, folder):
    (folder / "notes.jpg").write_bytes(b"these are my notes")
    (folder / "tiny.jpg").write_bytes(jpeg(40, 40))
    ids = queued(store, folder)
    (folder / "c.jpg").unlink()
    process_batch(ids, context(store, StubRecognizer(lambda image: FOUND)))
    codes = {k: (r["error"] or {}).get("code") for k, r in by_key(store).items()}
    assert codes == {"a.jpg": None, "b.jpg": None, "c.jpg": "ObjectNotFound",
                     "notes.jpg": "InvalidImageFormat", "tiny.jpg": "ImageTooSmall"}


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
    (folder / "b.jpg").write_bytes(jpeg(300, 200))
    (folder / "c.jpg").write_bytes(jpeg(320, 200))
    for _ in range(MAX_DELIVERIES):
        with pytest.raises(WorkerKilled):
            process_batch(ids, context(store, StubRecognizer(answer)))
    process_batch(ids, context(store, StubRecognizer(answer)))
    records = by_key(store)
    assert records["a.jpg"]["error"]["code"] == "Quarantined"
    assert records["b.jpg"]["status"] == records["c.jpg"]["status"] == "done"
    assert poison_id == min(ids)


def test_context_from_settings_builds_the_local_recognizer(sqlite_url):
    from worker.settings import Settings

    ctx = WorkerContext.from_settings(Settings(database_url=sqlite_url))
    assert ctx.recognizer.name == "local" and len(ctx.recognizer.gallery) == 0
    assert isinstance(ctx.store, ResultStore)


def test_a_batch_for_another_recognizer_is_failed_unread(store, folder):
    """A worker started with another CELEBSCAN_BACKEND than the scan's records why, and reads nothing."""
    scan_id = store.create_scan(str(folder), "rekognition")
    ids = store.queue_images(scan_id, str(folder), "rekognition", list_folder(folder)).image_ids
    stub = StubRecognizer(lambda image: FOUND)
    report = process_batch(ids, context(store, stub))
    assert (report.done, report.failed, stub.calls) == (0, 3, 0)
    errors = {r["error"]["code"] for r in by_key(store).values()}
    assert errors == {"BackendMismatch"}
    assert "CELEBSCAN_BACKEND=rekognition" in next(iter(by_key(store).values()))["error"]["message"]
