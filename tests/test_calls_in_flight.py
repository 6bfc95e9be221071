"""Calls in flight: a run keeps CELEBSCAN_CALLS_IN_FLIGHT paid calls going at once, claims its
scan's next batches as calls come back, writes each batch in one transaction, pays once for copies
in flight together, and at its time limit writes what came back and gives back the rest. On both
databases, with a paid recognizer stand-in that holds each call until enough are in flight.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter

import pytest
from billiard.exceptions import SoftTimeLimitExceeded
from sqlalchemy import func, select

from tests.conftest import folder_worker_context
from tests.imagemaker import jpeg
from worker.batch import take_next_batch
from worker.inflight import InlineLanes, LaneInterrupted, RunPictures, ThreadLanes
from worker.listing import list_folder
from worker.queue.images import ImageQueue
from worker.recognition import RecognitionResult
from worker.schema import images


class PaidStandIn:
    """A paid recognizer that answers a call only once ``together`` calls are in flight at once
    (a barrier): a run that made its calls one after another would never get an answer."""

    name = "rekognition"

    def __init__(self, together: int, on_call=None) -> None:
        self.barrier = threading.Barrier(together, timeout=20)
        self.lock = threading.Lock()
        self.in_flight = self.most_in_flight = 0
        self.by_picture: Counter[int] = Counter()
        self.on_call = on_call

    def recognize(self, image, location=None) -> RecognitionResult:
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            self.by_picture[image.width] += 1
            calls = sum(self.by_picture.values())
        try:
            if self.on_call is not None:
                self.on_call(calls)
            self.barrier.wait()
            return RecognitionResult()
        finally:
            with self.lock:
                self.in_flight -= 1

    @property
    def calls(self) -> int:
        return sum(self.by_picture.values())


def queued_scan(store, tmp_path, pictures: list[bytes], batch_size: int):
    folder = tmp_path / "photos"
    folder.mkdir()
    for number, data in enumerate(pictures):
        (folder / f"{number:04d}.jpg").write_bytes(data)
    scan_id = store.create_scan(str(folder), "rekognition", batch_size=batch_size)
    store.queue_images(scan_id, str(folder), "rekognition", list_folder(folder))
    return scan_id


def counted_writes(monkeypatch) -> list[int]:
    """The number of outcomes of each write transaction."""
    sizes: list[int] = []
    write = ImageQueue.write

    def counting(self, token, outcomes):
        sizes.append(len(outcomes))
        return write(self, token, outcomes)

    monkeypatch.setattr(ImageQueue, "write", counting)
    return sizes


def in_flight_context(store, recognizer, calls_in_flight: int):
    context = folder_worker_context(store, recognizer)
    context.calls_in_flight = calls_in_flight
    return context


def test_a_run_keeps_its_calls_in_flight_and_writes_each_batch_in_one_transaction(store, tmp_path, monkeypatch):
    pictures = [jpeg(200 + number, 150) for number in range(64)]
    scan_id = queued_scan(store, tmp_path, pictures, batch_size=8)
    standin = PaidStandIn(together=16)
    writes = counted_writes(monkeypatch)

    step = take_next_batch(scan_id, in_flight_context(store, standin, 16), "run-1")

    assert step.report.done == 64 and step.next_in == 0.0, step.report
    assert standin.most_in_flight == 16, "16 calls in flight at once, never more"
    assert standin.calls == 64 and set(standin.by_picture.values()) == {1}
    assert writes == [8] * 8, "each batch of 8 written in one transaction"
    with store.engine.connect() as conn:
        rows = conn.execute(select(images.c.status, func.sum(images.c.paid_calls)).group_by(images.c.status)).all()
    assert rows == [("done", 64)]
    assert store.summary(scan_id).finished_at is not None


def test_copies_in_flight_together_in_one_run_are_paid_once(store, tmp_path, monkeypatch):
    distinct = [jpeg(300 + number, 150) for number in range(4)]
    scan_id = queued_scan(store, tmp_path, distinct * 4, batch_size=16)
    standin = PaidStandIn(together=4)

    step = take_next_batch(scan_id, in_flight_context(store, standin, 16), "run-1")

    assert step.report.done == 16
    assert standin.calls == 4 and set(standin.by_picture.values()) == {1}, standin.by_picture
    with store.engine.connect() as conn:
        copies = conn.execute(select(func.count()).where(images.c.copied_from.is_not(None))).scalar_one()
        paid = conn.execute(select(func.sum(images.c.paid_calls))).scalar_one()
    assert copies == 12 and paid == 4


def test_at_its_time_limit_a_run_writes_what_came_back_and_gives_back_the_rest(store, tmp_path, monkeypatch):
    """Celery raises SoftTimeLimitExceeded in the run's thread (a signal); calls in flight come back
    and are written with their paid calls; images not started go back to the queue, unclaimed."""

    handled = threading.Event()

    def time_limit(signum, frame):
        handled.set()
        raise SoftTimeLimitExceeded()

    previous = signal.signal(signal.SIGUSR1, time_limit)
    try:
        scan_id = queued_scan(store, tmp_path, [jpeg(200 + number, 150) for number in range(40)], batch_size=16)

        def limit_at_the_third_call(calls: int) -> None:
            if calls == 3:
                os.kill(os.getpid(), signal.SIGUSR1)
            if calls >= 3:  # calls in flight when the limit strikes come back after it
                assert handled.wait(20)

        standin = PaidStandIn(together=1, on_call=limit_at_the_third_call)
        step = take_next_batch(scan_id, in_flight_context(store, standin, 4), "run-1")
    finally:
        signal.signal(signal.SIGUSR1, previous)

    with store.engine.connect() as conn:
        rows = conn.execute(select(images.c.status, images.c.claimed_by, images.c.attempts, images.c.paid_calls)).all()
    done = [row for row in rows if row.status == "done"]
    queued = [row for row in rows if row.status == "queued"]
    assert len(done) + len(queued) == 40, "nothing failed"
    assert 3 <= len(done) == standin.calls < 16, "every call made is written; the images not started go back"
    assert step.report.done == len(done) and step.report.released == 16 - len(done), step.report
    assert all(row.claimed_by is None and row.attempts == 0 and row.paid_calls == 0 for row in queued)
    assert sum(row.paid_calls for row in done) == standin.calls, "every call made is recorded"


def test_run_pictures_let_one_image_of_a_picture_call_and_its_copies_wait():
    pictures: RunPictures[str, str] = RunPictures()
    assert pictures.first_or_wait("p", patience=5) == ("mine", None)
    answers = []
    waiter = threading.Thread(target=lambda: answers.append(pictures.first_or_wait("p", patience=5)))
    waiter.start()
    pictures.finish("p", "result")
    waiter.join()
    assert answers == [("copy", "result")]
    assert pictures.first_or_wait("q", patience=5) == ("mine", None)
    assert pictures.first_or_wait("q", patience=0.01) == ("busy", None), "still in flight: wait for a later turn"
    pictures.finish("q", None)  # failed: nothing to copy, the next copy calls itself
    assert pictures.first_or_wait("q", patience=5) == ("mine", None)


@pytest.mark.parametrize("lanes", [InlineLanes(), ThreadLanes(4)], ids=["inline", "threads"])
def test_lanes_cancel_what_has_not_started(lanes):
    started = []
    futures = [lanes.submit(lambda n=n: started.append(n) or n) for n in range(3)]
    first = lanes.wait_any(futures, timeout=5)
    assert first and all(future.result() in range(3) for future in first)
    lanes.close()
    assert all(future.done() for future in futures)
    assert sorted(f.result() for f in futures if not f.cancelled()) == sorted(started)


def test_a_slow_call_never_lets_a_run_start_more_than_its_lanes_and_two_batches(store, tmp_path):
    """A batch is written when its last image is back, so a slow call keeps its batch open; the run
    claims more only while what it started and has not written stays within its lanes and a batch:
    all that a crash could make it pay for again."""
    lanes, batch = 4, 4
    scan_id = queued_scan(store, tmp_path, [jpeg(160 + number, 120) for number in range(48)], batch_size=batch)
    most_started = []

    class OneSlowCallPerBatch:
        name = "rekognition"

        def recognize(self, image, location=None):
            with store.engine.connect() as conn:
                started = conn.execute(
                    select(func.count()).where(images.c.status == "queued", images.c.started_by.is_not(None))
                ).scalar_one()
            most_started.append(started)
            time.sleep(0.6 if image.width % batch == 0 else 0.01)  # a straggler: a retried, slow call
            return RecognitionResult()

    step = take_next_batch(scan_id, in_flight_context(store, OneSlowCallPerBatch(), lanes), "run-1")

    assert step.report.done == 48
    assert max(most_started) <= lanes + 2 * batch, max(most_started)


def test_a_database_error_before_a_call_defers_the_image(store, tmp_path, monkeypatch):
    from sqlalchemy.exc import DatabaseError

    from worker.queue.pictures import PictureLocks

    def broken(self, picture, token):
        raise DatabaseError("SELECT", {}, Exception("the server closed the connection"))

    monkeypatch.setattr(PictureLocks, "take", broken)
    scan_id = queued_scan(store, tmp_path, [jpeg(200 + number, 150) for number in range(4)], batch_size=4)
    standin = PaidStandIn(together=1)
    step = take_next_batch(scan_id, in_flight_context(store, standin, 4), "run-1")
    with store.engine.connect() as conn:
        rows = conn.execute(select(images.c.status, images.c.error_code)).all()
    assert standin.calls == 0 and step.report.failed == 0 and len(step.report.deferred) == 4
    assert set(rows) == {("queued", "DatabaseUnavailable")}


def test_inline_lanes_never_wait_for_work_a_time_limit_cut_short():
    """A time limit that strikes between taking a call and running it leaves its future running
    with nothing to run it: waiting for it must end (the image has no outcome), not spin."""
    lanes = InlineLanes()
    future = lanes.submit(lambda: "never run")
    lanes._waiting.clear()  # what the cut-short step left: the call taken, its future not ended
    future.set_running_or_notify_cancel()
    assert lanes.wait_any([future], timeout=1) == {future}
    assert isinstance(future.exception(), LaneInterrupted)


def test_a_run_that_fails_writes_the_calls_it_paid_for_first(store, tmp_path, monkeypatch):
    """Any error in the run (here a claim that fails on the third batch) still writes what came
    back before it goes on: no paid call is lost, and nothing stays claimed."""
    scan_id = queued_scan(store, tmp_path, [jpeg(200 + number, 150) for number in range(24)], batch_size=4)
    claim = ImageQueue.claim
    claims = []
    failed, second_batch_called = threading.Event(), threading.Event()

    def failing_third(self, *arguments):
        claims.append(arguments)
        if len(claims) == 3:
            assert second_batch_called.wait(20)
            failed.set()
            raise RuntimeError("a bug in the third claim")
        return claim(self, *arguments)

    def second_batch_out_when_it_fails(calls: int) -> None:
        if calls > 4:
            second_batch_called.set()
            assert failed.wait(20)

    monkeypatch.setattr(ImageQueue, "claim", failing_third)
    standin = PaidStandIn(together=1, on_call=second_batch_out_when_it_fails)
    with pytest.raises(RuntimeError, match="third claim"):
        take_next_batch(scan_id, in_flight_context(store, standin, 8), "run-1")
    with store.engine.connect() as conn:
        rows = conn.execute(select(images.c.status, images.c.paid_calls, images.c.claimed_by)).all()
    done = [row for row in rows if row.status == "done"]
    assert len(done) == standin.calls > 4, "the second batch's calls out when the run failed are written too"
    assert sum(row.paid_calls for row in done) == standin.calls
    assert all(row.claimed_by is None for row in rows), "every claim given back"
