"""A video as an item of the queue of record, across the many runs its job lives through: what one
run's step leaves on its row for the next (both databases)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.conftest import folder_worker_context
from worker import clock
from worker.batch import _transient_outcome
from worker.errors import ThrottledError
from worker.listing import ListedObject
from worker.queue.images import ImageQueue
from worker.recognizers.stub import StubRecognizer
from worker.schema import QUEUED
from worker.videos.step import video_waiting


class SteppingClock:
    def __init__(self) -> None:
        self.moment = datetime.now(UTC)

    def now(self) -> datetime:
        return self.moment

    def monotonic(self) -> float:
        return self.moment.timestamp()

    def sleep(self, seconds: float) -> None:
        self.moment += timedelta(seconds=seconds)


@pytest.fixture
def stepping():
    with clock.using(SteppingClock()) as stepping_clock:
        yield stepping_clock


def test_a_step_that_went_well_ends_a_videos_streak_of_transient_errors(store, stepping):
    """A Rekognition Video job runs for hours; one look at it was throttled early on, every look
    since went well. A throttled look two hours later is a new streak: the video is deferred, not
    failed as if it had been failing since the first ("gave up after ... over 2h", its job left
    running and counted against the quota)."""
    context = folder_worker_context(store, StubRecognizer())
    scan_id = store.create_scan("/videos", "rekognition")
    [video_id] = store.queue_images(scan_id, "/videos", "rekognition", [ListedObject("long.mp4", "e", 100)]).image_ids
    queue = ImageQueue(store.engine, lease_seconds=60)

    def step(run: str, outcome_of) -> str:
        assert queue.claim(scan_id, 16, run) == [video_id]
        [video] = queue.start(run, queue.held(run, [video_id]), 3).images
        outcome = outcome_of(video)
        assert queue.write(run, [outcome]).written == {video_id}
        return outcome.status

    throttled = ThrottledError("Rate exceeded", code="ThrottlingException")
    assert step("run-0", lambda video: _transient_outcome(video, throttled, context, None, None)) == QUEUED
    for look in range(1, 25):  # every 5 minutes for two hours: the job is still running
        stepping.sleep(300)
        assert step(f"run-{look}", lambda video: video_waiting(video, 1)) == QUEUED
    stepping.sleep(300)
    status = step("run-last", lambda video: _transient_outcome(video, throttled, context, None, None))
    assert status == QUEUED, "a throttled look after two hours of good ones is tried again"
