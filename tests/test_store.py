"""The results store on SQLite and on a real PostgreSQL server."""

import pytest
from sqlalchemy import func, select

from tests.conftest import write_outcomes
from worker.listing import ListedObject
from worker.outcomes import ImageOutcome
from worker.recognition import BoundingBox, Celebrity, RecognitionResult, UnrecognizedFace
from worker.schema import faces, images

BUCKET = "/photos"


def listing(*names, etag="e1"):
    return [ListedObject(key=name, etag=etag, size=100) for name in names]


def result(*names, unknown=0):
    box = BoundingBox(0.1, 0.2, 0.3, 0.4)
    return RecognitionResult(
        celebrities=tuple(Celebrity(name=n, id=f"id-{n}", match_confidence=90.0, bounding_box=box) for n in names),
        unrecognized_faces=tuple(UnrecognizedFace(bounding_box=box, confidence=99.0) for _ in range(unknown)),
    )


def count(store, table, *where):
    with store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table).where(*where)).scalar()


def queue(store, names, **kwargs):
    scan_id = store.create_scan(BUCKET, "local")
    return scan_id, store.queue_images(scan_id, BUCKET, "local", listing(*names), **kwargs)


def finish_all(store, report, answer=None, token="test-run"):
    answer = answer or result("obama")
    write_outcomes(store, [ImageOutcome.done(i, 640, 480, answer) for i in report.image_ids], token)


def test_listing_queues_each_image_once(store):
    scan_id, report = queue(store, ["a.jpg", "b.jpg", "a.jpg"])
    assert report.listed == 3 and len(report.image_ids) == 2
    assert count(store, images) == 2
    assert {i.key for i in store.images.queued(report.image_ids)} == {"a.jpg", "b.jpg"}


def test_rescan_skips_done_images_and_requeues_failed_ones(store):
    _, first = queue(store, ["a.jpg", "b.jpg", "c.jpg"])
    a, b, c = first.image_ids
    write_outcomes(store, [ImageOutcome.done(a, 10, 10, result()), ImageOutcome.failed(b, "CorruptImage", "bad")])
    second_scan, second = queue(store, ["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    assert second.skipped == 1
    assert sorted(second.image_ids)[:2] == [b, c] and len(second.image_ids) == 3
    assert {i.scan_id for i in store.images.queued(second.image_ids)} == {second_scan}
    assert count(store, images) == 4


def test_changed_content_is_a_new_image(store):
    _, first = queue(store, ["a.jpg"])
    finish_all(store, first)
    scan_id = store.create_scan(BUCKET, "local")
    report = store.queue_images(scan_id, BUCKET, "local", listing("a.jpg", etag="e2"))
    assert len(report.image_ids) == 1 and report.image_ids != first.image_ids
    finish_all(store, report, result("biden"))
    latest = list(store.result_records())
    assert [(r.etag, r.celebrities[0].name) for r in latest] == [("e2", "biden")]


def test_force_requeues_done_images(store):
    _, first = queue(store, ["a.jpg"])
    finish_all(store, first)
    _, forced = queue(store, ["a.jpg"], force=True)
    assert forced.image_ids == first.image_ids and forced.skipped == 0


def test_saving_a_batch_twice_does_not_double_rows(store):
    _, report = queue(store, ["a.jpg", "b.jpg"])
    outcomes = [
        ImageOutcome.done(i, 640, 480, result("obama", "biden", unknown=1), paid_calls=1) for i in report.image_ids
    ]
    first = write_outcomes(store, outcomes)
    again = store.images.write("test-run", outcomes)  # a replay: its commit's acknowledgement was lost
    assert first.written == again.replayed == set(report.image_ids) and not again.written and not again.refused
    assert count(store, faces) == 6
    assert count(store, images, images.c.status == "done") == 2
    assert store.scan_summary(store.latest_scan_id()).paid_calls == 2


def test_a_replayed_write_counts_once_even_after_its_images_moved_on(store):
    """Its commit's acknowledgement was lost, and before the retry a --force scan took the image
    over: the replay is still the write that committed, not a refused one (its call counted once;
    found by the simulation, seed 52708)."""
    first_scan, report = queue(store, ["a.jpg"])
    outcomes = [ImageOutcome.done(i, 640, 480, result("obama"), paid_calls=1) for i in report.image_ids]
    first = write_outcomes(store, outcomes)
    forced_scan, forced = queue(store, ["a.jpg"], force=True)
    assert forced.image_ids == report.image_ids, "the forced scan took the image over"
    again = store.images.write("test-run", outcomes)
    assert again.replayed == first.written and not again.written and not again.refused
    paid = sum(store.scan_summary(scan).paid_calls for scan in (first_scan, forced_scan))
    assert paid == 1 and count(store, images, images.c.status == "queued") == 1


def test_reprocessed_image_replaces_its_faces(store):
    _, report = queue(store, ["a.jpg"])
    [image_id] = report.image_ids
    write_outcomes(store, [ImageOutcome.done(image_id, 640, 480, result("obama", "biden"))], "first-run")
    queue(store, ["a.jpg"], force=True)
    write_outcomes(store, [ImageOutcome.done(image_id, 640, 480, result("obama"))], "second-run")
    assert [r.celebrities for r in store.result_records()][0][0].name == "obama"
    assert count(store, faces) == 1


def test_records_have_the_design_shape(store):
    scan_id, report = queue(store, ["ok.jpg", "bad.jpg"])
    ok, bad = report.image_ids
    write_outcomes(
        store,
        [
            ImageOutcome.done(ok, 1480, 832, result("obama", unknown=1)),
            ImageOutcome.failed(bad, "InvalidImageFormat", "not an image"),
        ],
    )
    records = {r.key: r.to_dict() for r in store.result_records(scan_id)}
    assert set(records["ok.jpg"]) == {
        "scan_id",
        "source",
        "key",
        "etag",
        "status",
        "error",
        "backend",
        "width",
        "height",
        "celebrities",
        "unrecognized_faces",
    }
    assert records["ok.jpg"]["celebrities"] == [
        {
            "name": "obama",
            "id": "id-obama",
            "match_confidence": 90.0,
            "bounding_box": {"left": 0.1, "top": 0.2, "width": 0.3, "height": 0.4},
            "urls": [],
        }
    ]
    assert records["ok.jpg"]["unrecognized_faces"][0]["confidence"] == 99.0
    assert records["ok.jpg"]["error"] is None and records["ok.jpg"]["width"] == 1480
    assert records["bad.jpg"]["status"] == "failed"
    assert records["bad.jpg"]["error"] == {"code": "InvalidImageFormat", "message": "not an image"}


def test_scan_finishes_when_nothing_is_queued(store):
    scan_id, report = queue(store, ["a.jpg", "b.jpg"])
    a, b = report.image_ids
    write_outcomes(store, [ImageOutcome.done(a, 10, 10, result("obama"))], "run-a")
    assert store.scan_summary(scan_id).finished_at is None
    write_outcomes(store, [ImageOutcome.failed(b, "CorruptImage", "bad")], "run-b")
    summary = store.scan_summary(scan_id)
    assert summary.finished_at is not None
    assert summary.counts == {"queued": 0, "done": 1, "failed": 1}
    assert summary.people == {"obama": 1} and summary.failures == {"CorruptImage": 1}


def test_start_counts_runs_that_never_ended_and_quarantines_repeat_offenders(store):
    from worker.queue.images import ImageQueue

    _, report = queue(store, ["poison.jpg", "fine.jpg"])
    lapsing = ImageQueue(store.engine, lease_seconds=0)  # every claim is taken over at once
    for run in range(3):  # three runs start the images and die before writing
        token = f"run-{run}"
        assert lapsing.claim_ids(report.image_ids, token) == report.image_ids
        batch = lapsing.held(token, report.image_ids)
        started = lapsing.start(token, batch, max_starts=3)
        assert len(started.images) == 2 and started.quarantined == 0
        assert lapsing.start(token, batch, max_starts=3) == started, "a replayed start counts once"
    lapsing.claim_ids(report.image_ids, "run-3")
    started = lapsing.start("run-3", lapsing.held("run-3", report.image_ids), max_starts=3)
    assert started.images == [] and started.quarantined == 2
    records = list(store.result_records())
    assert {r.error.code for r in records} == {"Quarantined"}


def test_a_run_that_ends_without_crashing_gives_its_starts_back(store):
    _, report = queue(store, ["a.jpg"])
    images_queue = store.images
    images_queue.claim_ids(report.image_ids, "run-1")
    images_queue.start("run-1", images_queue.held("run-1", report.image_ids), max_starts=3)
    assert images_queue.release("run-1") == 1
    [image] = images_queue.queued(report.image_ids)
    assert (image.attempts, image.started_by) == (0, None)
    assert images_queue.release("run-1") == 0, "released once"
    assert images_queue.claim_ids(report.image_ids, "run-2") == report.image_ids


def test_many_images_are_written_in_chunks(store):
    names = [f"img/{i:05d}.jpg" for i in range(2500)]
    scan_id, report = queue(store, names)
    assert len(report.image_ids) == 2500
    finish_all(store, report)
    assert sum(1 for _ in store.result_records(scan_id)) == 2500
    assert count(store, faces) == 2500


def test_keys_are_stored_verbatim(store):
    odd = [
        "héllo wörld.jpg",
        "a+b%20c.jpg",
        "x'; DROP TABLE images; --.jpg",
        "日本/写真.png",
        "$(rm -rf ~); ls `id` | cat.jpg",
        'quote"s\\back.jpg',
    ]
    _, report = queue(store, odd)
    assert sorted(i.key for i in store.images.queued(report.image_ids)) == sorted(odd)


def test_a_write_for_an_image_the_run_does_not_hold_changes_nothing_of_it(store):
    """Faces never point at no image: only the images the run still holds are written; the rest
    (here one the store lacks) is refused and recorded, and the batch's other images are written."""
    _, report = queue(store, ["a.jpg"])
    [image_id] = report.image_ids
    written = write_outcomes(
        store,
        [
            ImageOutcome.done(image_id, 640, 480, result("obama")),
            ImageOutcome.done(image_id + 1000, 640, 480, result("biden"), paid_calls=1),
        ],
    )
    assert written.written == {image_id} and written.refused == {image_id + 1000}
    assert count(store, images, images.c.status == "done") == 1
    assert count(store, faces) == 1


def test_a_face_row_the_server_refuses_rolls_back_the_whole_batch(pg_store):
    """A value PostgreSQL cannot store (a NUL character) fails the COPY mid-stream: the image
    updates already made in the transaction are undone, and the next batch writes normally."""
    import pytest
    from sqlalchemy.exc import DBAPIError

    _, report = queue(pg_store, ["a.jpg", "b.jpg"])
    a, b = report.image_ids
    with pytest.raises(DBAPIError, match="0x00"):
        write_outcomes(
            pg_store,
            [ImageOutcome.done(a, 640, 480, result("obama")), ImageOutcome.done(b, 640, 480, result("bad\x00name"))],
        )
    assert count(pg_store, images, images.c.status == "queued") == 2
    assert count(pg_store, faces) == 0
    finish_all(pg_store, report)
    assert count(pg_store, faces) == 2


def test_a_result_that_cannot_be_encoded_rolls_back_and_leaves_the_connection_usable(pg_store):
    """An error in our own code in the middle of the COPY (here: a value JSON cannot hold) must not
    leave a half-open transaction on the pooled connection (the store's only one, used again next)."""
    import pytest

    bad = RecognitionResult(
        celebrities=(
            Celebrity(
                name="x",
                id="1",
                match_confidence=90.0,
                bounding_box=BoundingBox(0.1, 0.2, 0.3, 0.4),
                raw={"Odd": {1, 2}},
            ),
        )
    )
    _, report = queue(pg_store, ["a.jpg", "b.jpg"])
    a, b = report.image_ids
    with pytest.raises(TypeError):
        write_outcomes(pg_store, [ImageOutcome.done(a, 640, 480, result("obama")), ImageOutcome.done(b, 640, 480, bad)])
    assert count(pg_store, images, images.c.status == "queued") == 2
    finish_all(pg_store, report)
    assert count(pg_store, faces) == 2 and count(pg_store, images, images.c.status == "done") == 2


def test_text_and_json_that_need_escaping_come_back_unchanged(store):
    awkward = 'tab\there, new\nline, back\\slash \\N, quote " and 名前'
    raw = {"Name": awkward, "Face": {"Pose": {"Roll": -1.5}, "Note": awkward, "Path": "C:\\x\\N"}}
    answer = RecognitionResult(
        celebrities=(
            Celebrity(
                name=awkward,
                id="id\t1",
                match_confidence=90.0,
                bounding_box=BoundingBox(0.1, 0.2, 0.3, 0.4),
                urls=(awkward,),
                raw=raw,
            ),
        )
    )
    scan_id, report = queue(store, ["a.jpg"])
    finish_all(store, report, answer)
    [record] = store.result_records(scan_id)
    [celebrity] = record.celebrities
    assert (celebrity.name, celebrity.id, celebrity.urls) == (awkward, "id\t1", (awkward,))
    with store.engine.connect() as conn:
        details = conn.execute(select(faces.c.details)).scalar_one()
    assert details == {"Face": {"Pose": {"Roll": -1.5}, "Note": awkward, "Path": "C:\\x\\N"}}


def test_a_database_from_an_older_version_gets_the_new_columns_and_indexes(store):
    from sqlalchemy import inspect, text

    from worker.store import ResultStore

    _, report = queue(store, ["a.jpg"])
    with store.engine.begin() as conn:  # as the first release made it
        conn.execute(text("DROP INDEX ix_images_scan_status_id"))
        conn.execute(text("ALTER TABLE images DROP COLUMN paid_calls"))
        conn.execute(text("ALTER TABLE images DROP COLUMN calls_saved"))
        conn.execute(text("ALTER TABLE scans DROP COLUMN prefilter_faces"))
    upgraded = ResultStore.connect(store.engine.url.render_as_string(hide_password=False))
    inspector = inspect(upgraded.engine)
    assert {"paid_calls", "calls_saved"} <= {c["name"] for c in inspector.get_columns("images")}
    assert "ix_images_scan_status_id" in {i["name"] for i in inspector.get_indexes("images")}
    write_outcomes(upgraded, [ImageOutcome.done(report.image_ids[0], 10, 10, result("obama"), paid_calls=1)])
    assert upgraded.scan_summary(upgraded.latest_scan_id()).paid_calls == 1
    upgraded.engine.dispose()


def test_two_writers_of_the_same_batch_at_once_leave_one_set_of_faces(pg_store):
    """One write can reach the server twice at the same moment (a write retried while the first
    attempt still runs): the second waits for the first's row locks, then finds the images written
    by its own run and changes nothing; neither fails and no face is doubled."""
    import threading

    for attempt in range(10):
        _, report = queue(pg_store, [f"{attempt}-{i}.jpg" for i in range(20)])
        token = f"run-{attempt}"
        pg_store.images.claim_ids(report.image_ids, token)
        outcomes = [ImageOutcome.done(i, 640, 480, result("obama", unknown=attempt % 3)) for i in report.image_ids]
        start, errors, results = threading.Barrier(2), [], []

        def write(start=start, outcomes=outcomes, errors=errors, results=results, token=token):
            start.wait()
            try:
                results.append(pg_store.images.write(token, outcomes))
            except Exception as exc:  # reported below, with the attempt
                errors.append(exc)

        writers = [threading.Thread(target=write) for _ in range(2)]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join()
        assert errors == [], f"attempt {attempt}: {errors}"
        assert sorted(len(r.written) for r in results) == [0, 20] and not any(r.refused for r in results)
        assert count(pg_store, faces, faces.c.image_id.in_(report.image_ids)) == 20 * (1 + attempt % 3)


def _open_at_once(barrier, url: str, errors) -> None:
    from worker.store import ResultStore

    barrier.wait(timeout=60)
    try:
        ResultStore.connect(url).engine.dispose()
    except BaseException as exc:  # reported to the test
        errors.put(f"{type(exc).__name__}: {exc}")


def _schema(url: str) -> dict:
    from sqlalchemy import create_engine, inspect

    engine = create_engine(url)
    inspector = inspect(engine)
    schema = {
        table: (
            sorted(c["name"] for c in inspector.get_columns(table)),
            sorted(i["name"] for i in inspector.get_indexes(table)),
        )
        for table in inspector.get_table_names()
    }
    engine.dispose()
    return schema


@pytest.mark.slow
@pytest.mark.parametrize("starting_from", ["an empty database", "an older schema"])
def test_eight_processes_opening_the_database_at_once_make_one_schema(postgres_url, starting_from):
    """A fleet scaling out from zero: every worker process creates or upgrades the schema at start."""
    import multiprocessing

    from sqlalchemy import create_engine, text

    from tests.conftest import _reset_postgres
    from worker.store import ResultStore

    _reset_postgres(postgres_url)
    ResultStore.connect(postgres_url).engine.dispose()
    expected = _schema(postgres_url)
    _reset_postgres(postgres_url)
    if starting_from == "an older schema":
        ResultStore.connect(postgres_url).engine.dispose()
        engine = create_engine(postgres_url)
        with engine.begin() as conn:
            conn.execute(text("DROP INDEX ix_images_scan_status_id"))
            conn.execute(text("ALTER TABLE images DROP COLUMN paid_calls, DROP COLUMN retries, DROP COLUMN started_by"))
            conn.execute(text("ALTER TABLE scans DROP COLUMN unserved_at"))
        engine.dispose()
    spawn = multiprocessing.get_context("spawn")
    barrier, errors = spawn.Barrier(8), spawn.Queue()
    processes = [spawn.Process(target=_open_at_once, args=(barrier, postgres_url, errors)) for _ in range(8)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [process.exitcode for process in processes] == [0] * 8
    assert errors.empty(), errors.get()
    assert _schema(postgres_url) == expected
    _reset_postgres(postgres_url)
