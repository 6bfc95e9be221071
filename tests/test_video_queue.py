"""A video as an item of the queue of record, across the many runs its job lives through: what one
run's step leaves on its row for the next (both databases)."""

from __future__ import annotations

import pytest

from tests.clocks import SteppingClock
from tests.conftest import folder_worker_context
from worker import clock
from worker.batch import _transient_outcome
from worker.errors import ThrottledError
from worker.listing import ListedObject
from worker.queue.images import ImageQueue
from worker.recognizers.stub import StubRecognizer
from worker.schema import QUEUED
from worker.videos.step import video_waiting


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


def test_a_forced_scan_reuses_a_video_job_that_ended_since_it_began(store, stepping):
    """--force recognizes each picture afresh once, reusing results made since the forced scan
    began (issue 27); a video's job likewise: forced scan B reuses the job forced scan A ended after
    B began (the same bytes under another key), and starts a new one over a job older than itself."""
    from worker.queue.videos import SUCCEEDED, VideoJobs

    jobs = VideoJobs(store.engine)
    queue = ImageQueue(store.engine, lease_seconds=60)

    def video_of(scan_id: int, key: str, run: str):
        [video_id] = store.queue_images(scan_id, "/v", "local", [ListedObject(key, "e", 100)]).image_ids
        assert queue.claim(scan_id, 16, run) == [video_id]
        return queue.start(run, queue.held(run, [video_id]), 3).images[0]

    older = store.create_scan("/v", "local", reuse_results=False)
    old_job = jobs.open("run-o", video_of(older, "old.mp4", "run-o"), "md5", 1000).job
    assert old_job is not None and jobs.finish("run-o", old_job.image_id, old_job, {"appearances": []})
    stepping.sleep(60)
    forced_a = store.create_scan("/v", "local", reuse_results=False)
    stepping.sleep(60)
    forced_b = store.create_scan("/v", "local", reuse_results=False)
    stepping.sleep(60)

    a_job = jobs.open("run-a", video_of(forced_a, "a.mp4", "run-a"), "md5", 1000).job
    assert a_job is not None and a_job.generation == 1, "A's job ended before A began: done afresh"
    assert jobs.finish("run-a", a_job.image_id, a_job, {"appearances": []})
    b_job = jobs.open("run-b", video_of(forced_b, "b.mp4", "run-b"), "md5", 1000).job
    assert b_job is not None and b_job.status == SUCCEEDED
    assert b_job.generation == 1, "the job A ended after B began is B's result too: not paid again"


def test_a_job_no_queued_video_follows_any_more_leaves_its_place_in_the_quota(store):
    """A video that ended failed while its job ran (quarantined, or given up on) leaves the job
    `running` with nobody to look at it again: it must not hold one of the fleet's places for ever
    (the service itself refuses a start past the account's real quota: LimitExceededException)."""
    from worker.outcomes import ImageOutcome
    from worker.queue.videos import RUNNING, WAIT_SLOT, VideoJobs

    jobs = VideoJobs(store.engine)
    queue = ImageQueue(store.engine, lease_seconds=60)
    scan_id = store.create_scan("s3://b/", "rekognition")
    listed = [ListedObject("one.mp4", "e1", 100), ListedObject("two.mp4", "e2", 100)]
    first, second = store.queue_images(scan_id, "b", "rekognition", listed).image_ids

    def held(video_id: int, run: str):
        assert video_id in queue.claim(scan_id, 1, run)
        return queue.start(run, queue.held(run, [video_id]), 3).images[0]

    opened = jobs.open("run-1", held(first, "run-1"), "e1", 1000, quota=1)
    assert opened.job is not None and opened.job.status == RUNNING
    waiting = jobs.open("run-2", held(second, "run-2"), "e2", 1000, quota=1)
    assert waiting.waiting == WAIT_SLOT, "the quota is full while a queued video follows the job"
    queue.release("run-2")
    assert queue.write("run-1", [ImageOutcome.failed(first, "DecoderCrashed", "quarantined", None, None)]).written
    reopened = jobs.open("run-3", held(second, "run-3"), "e2", 1000, quota=1)
    assert reopened.job is not None and reopened.job.status == RUNNING
