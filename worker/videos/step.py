"""One step of a video item in a run: what the run that holds (and started) a video does with it.

A video is one item of the scan's queue, like an image; its work lives across runs in its job
(``worker/queue/videos.py``), and each step ends with an outcome the run writes as it writes an
image's: ``done`` with the video's appearances, ``failed`` with a code, or deferred (still queued)
until its next step is due. The run calls :func:`process_video` for every item whose row says
``media = 'video'``; errors are the run's to turn into outcomes, as for an image.

- **rekognition**: the first step reads the video's header by a few range requests and fails it
  with a code before any call when Rekognition Video would refuse it; then opens its job within the
  fleet's quota of concurrent jobs (or waits for a place) and starts it with the job's idempotency
  token, recording the JobId; later steps look at the job (with a growing wait, or when its
  completion message makes the video due) and, when it ended, read its results page by page into
  appearances. A copy under another key follows the same job.
- **local**: each step recognizes the frames of a slice of the video (sampled at
  ``CELEBSCAN_VIDEO_FRAMES_PER_SECOND``, one decoded frame in memory at a time, the object read
  by ranges) for at most ``CELEBSCAN_VIDEO_SLICE_SECONDS``, holding the video's bytes (a picture
  lock, so a copy under another key waits instead of working them too), then saves where it got to
  and the appearances so far; the step that reaches the end writes them.
"""

from __future__ import annotations

import hashlib
import random
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from worker import clock
from worker.database import aware_utc, utcnow
from worker.errors import CelebscanError, PermanentError, TransientError, VideoJobFailedError, VideoOverLimitsError
from worker.media.images import LoadedImage
from worker.media.video import ByteRanges, probe, sample_frames
from worker.outcomes import ImageOutcome, QueuedImage
from worker.queue.pictures import Picture
from worker.queue.videos import (
    FAILED,
    IDLE,
    RUNNING,
    SUCCEEDED,
    WAIT_SLOT,
    Job,
    VideoJobs,
)
from worker.recognizers import rekognition_video
from worker.recognizers.rekognition_video import RekognitionVideo
from worker.schema import DONE, QUEUED
from worker.settings import Settings
from worker.sources import Source
from worker.videos.appearances import Appearance, Merger

if TYPE_CHECKING:
    from worker.batch import WorkerContext

#: Frames larger than this are scaled down as they are decoded (detection and embeddings need no more).
FRAME_MAX_SIDE = 1920
#: A video whose bytes another run is working on waits about this long before it looks again.
BUSY_WAIT_SECONDS = 5.0


def process_video(video: QueuedImage, context: WorkerContext, token: str) -> ImageOutcome:
    """One step of ``video`` for the run ``token``: its outcome (done, failed, or deferred until
    its next step). Raises what the run turns into an outcome for any item (a transient error is
    deferred and tried again, a permanent one fails the video with its code)."""
    settings = context.settings or Settings()
    if video.size > settings.max_video_bytes:
        raise VideoOverLimitsError(
            f"the video is {video.size:,} bytes; the limit is {settings.max_video_bytes:,} (CELEBSCAN_MAX_VIDEO_BYTES)",
            code="VideoTooLarge",
        )
    if video.backend == "local":
        return _LocalStep(video, context, token, settings).run()
    if video.backend == "rekognition":
        return _RekognitionStep(video, context, token, settings).run()
    raise PermanentError(f"the {video.backend} recognizer does not scan videos", code="VideoNotSupported")


def video_done(video: QueuedImage, result: dict[str, Any]) -> ImageOutcome:
    """The outcome of a video whose job succeeded: its appearances, from the job's result."""
    return ImageOutcome(
        video.id,
        DONE,
        result.get("width"),
        result.get("height"),
        appearances=tuple(Appearance.from_json(a) for a in result["appearances"]),
        duration_ms=result.get("duration_ms"),
    )


def video_waiting(video: QueuedImage, seconds: float, content_hash: str | None = None) -> ImageOutcome:
    """The video waits ``seconds`` (its job runs, a slice is next, or it waits for a place). The
    step went well: a streak of transient errors before it is over (its retries start again at 0,
    and the retry deadline counts from the next one), as a video's job may run for hours."""
    return ImageOutcome(
        video.id,
        QUEUED,
        attempts=video.attempts,
        retries=0,
        not_before=utcnow() + timedelta(seconds=seconds),
        content_hash=content_hash,
    )


def ended(video: QueuedImage, job: Job) -> ImageOutcome | None:
    """The outcome of a video whose job ended, or None while it runs."""
    if job.status == SUCCEEDED:
        return video_done(video, job.result)
    if job.status == FAILED:
        raise PermanentError(job.error_message or "the video's job failed", code=job.error_code or "VideoJobFailed")
    return None


def _lock_key(content_key: str) -> str:
    """The bytes as a picture lock names them (32 hex digits, whatever the key's form)."""
    return hashlib.md5(content_key.encode(), usedforsecurity=False).hexdigest()


class _LocalStep:
    def __init__(self, video: QueuedImage, context: WorkerContext, token: str, settings: Settings) -> None:
        self.video, self.context, self.token, self.settings = video, context, token, settings
        self.jobs = VideoJobs(context.store.engine)
        self.source = Source.from_url(video.source)

    def run(self) -> ImageOutcome:
        video = self.video
        reader = self.context.readers[self.source.kind]
        ranges = reader.ranges(video.bucket, video.key, video.etag, video.size)  # type: ignore[attr-defined]
        try:
            content_key = video.etag if self.source.is_s3 else (video.content_hash or _md5(ranges))
            known_hash = None if self.source.is_s3 else content_key
            job = self.jobs.find("local", content_key, video.size)
            if job is None or job.status != RUNNING:
                info = probe(ranges) if job is None or not video.reuse_results else None
                opened = self.jobs.open(self.token, video, content_key, info.duration_ms if info else None)
                if opened.job is None:  # the run lost its claim: whatever it writes is refused
                    return video_waiting(video, BUSY_WAIT_SECONDS, known_hash)
                job = opened.job
            if (outcome := ended(video, job)) is not None:
                return outcome
            picture = Picture("local", _lock_key(content_key), video.size)
            if not self.context.pictures.take(picture, self.token):
                return video_waiting(video, random.uniform(BUSY_WAIT_SECONDS, 2 * BUSY_WAIT_SECONDS), known_hash)
            job = self.jobs.find("local", content_key, video.size) or job  # where the last holder left it
            if (outcome := ended(video, job)) is not None:
                return outcome
            return self._slice(ranges, job, known_hash)
        finally:
            ranges.close()

    def _slice(self, ranges: ByteRanges, job: Job, known_hash: str | None) -> ImageOutcome:
        """Recognize the frames from where the job stands, for at most a slice; save or finish."""
        settings, video = self.settings, self.video
        step_ms = 1000 / settings.video_frames_per_second
        gap_ms = round(1000 * max(settings.video_gap_seconds, 1.5 / settings.video_frames_per_second))
        progress = job.progress or {}
        merger = Merger(gap_ms, progress.get("appearances", ()))
        recognizer = self.context.recognizers.get("local")
        seconds = min(settings.video_slice_seconds, self.context.batch_seconds / 2)
        deadline = clock.monotonic() + seconds
        position, last = job.position_ms, progress.get("last_ms")
        width, height = progress.get("width"), progress.get("height")
        finished = True
        for frame in sample_frames(ranges, settings.video_frames_per_second, job.position_ms, FRAME_MAX_SIDE):
            pixels = frame.pixels
            height, width = pixels.shape[:2]
            result = recognizer.recognize(LoadedImage(pixels, "video frame", b""))
            for celebrity in result.celebrities:
                merger.add(
                    frame.timestamp_ms,
                    celebrity.name,
                    celebrity.id or None,
                    celebrity.match_confidence,
                    celebrity.bounding_box,
                    celebrity.urls,
                    celebrity.known_gender,
                )
            last = frame.timestamp_ms
            position = round(frame.timestamp_ms + step_ms)
            if clock.monotonic() >= deadline:
                finished = False
                break
        if not finished:
            progress = {"appearances": merger.state(), "last_ms": last, "width": width, "height": height}
            self.jobs.save_progress(self.token, video.id, job, position, progress)
            return video_waiting(video, 0, known_hash)
        duration_ms = job.duration_ms if job.duration_ms is not None else last
        found = {
            "appearances": [a.to_json() for a in merger.appearances()],
            "duration_ms": duration_ms,
            "width": width,
            "height": height,
        }
        if not self.jobs.finish(self.token, video.id, job, found, duration_ms):
            return video_waiting(video, 0, known_hash)  # another run moved the job on: look again
        return ImageOutcome(
            video.id,
            DONE,
            width,
            height,
            appearances=merger.appearances(),
            duration_ms=duration_ms,
            content_hash=known_hash,
        )


class _RekognitionStep:
    def __init__(self, video: QueuedImage, context: WorkerContext, token: str, settings: Settings) -> None:
        self.video, self.context, self.token, self.settings = video, context, token, settings
        self.jobs = VideoJobs(context.store.engine)
        recognizer = context.recognizers.get("rekognition")
        rekognition: Any = getattr(recognizer, "wrapped", recognizer)  # under the embeddings' RememberingRecognizer
        self.service = RekognitionVideo(rekognition.client, notification_channel(settings))

    def run(self) -> ImageOutcome:
        video = self.video
        job = self.jobs.find("rekognition", video.etag, video.size)
        if job is None or job.status == IDLE or self._redone(job):
            opened = self._open()
            if opened.job is None:
                return self._waiting_for(opened.waiting)
            job = opened.job
        if (outcome := ended(video, job)) is not None:
            return outcome
        if job.job_id is None:
            return self._start(job)
        return self._look(job)

    def _redone(self, job: Job) -> bool:
        """A --force scan's video whose job ended for another scan: a new job, unless it ended
        since this scan began (:meth:`VideoJobs.open` decides)."""
        return not self.video.reuse_results and job.status in (SUCCEEDED, FAILED) and job.scan_id != self.video.scan_id

    def _open(self):
        """The video's header read and held against the service's limits (no call yet), then its job opened."""
        video = self.video
        source = Source.from_url(video.source)
        rekognition_video.check_where(video.size, source.is_s3)
        ranges = self.context.readers["s3"].ranges(video.bucket, video.key, video.etag, video.size)  # type: ignore[attr-defined]
        try:
            info = probe(ranges)
        finally:
            ranges.close()
        rekognition_video.check_limits(info, video.size, in_s3=True)
        cost = (info.duration_ms or 0) / 60_000 * self.settings.rekognition_video_price
        return self.jobs.open(
            self.token, video, video.etag, info.duration_ms, quota=self.settings.rekognition_video_jobs, cost_usd=cost
        )

    def _waiting_for(self, why: str | None) -> ImageOutcome:
        if why == WAIT_SLOT:  # the run that ends a job hands its place on; this is in case it cannot
            return video_waiting(self.video, random.uniform(0.5, 1.0) * self.settings.video_poll_max_seconds)
        return video_waiting(self.video, self.settings.video_poll_seconds)  # no longer held (or left for --resume)

    def _start(self, job: Job) -> ImageOutcome:
        """Start the job (again, with its token, when a run died before recording it: the same
        JobId comes back) and keep its JobId."""
        video, token = self.video, self.token
        try:
            job_id = self.service.start(job.bucket, job.key, job.request_token, tag=f"celebscan-{job.id}")
        except TransientError as exc:  # its place is given back; a start lost in flight is found by its token
            self.jobs.give_back(token, video.id, job)
            if exc.code == "LimitExceededException":  # the account's jobs are more than this fleet counted
                return self._waiting_for(WAIT_SLOT)
            raise
        except CelebscanError as exc:
            self.jobs.fail(token, video.id, job, exc.code, str(exc))
            raise
        self.jobs.record_job_id(token, video.id, job, job_id)
        return video_waiting(video, self.settings.video_poll_seconds)

    def _look(self, job: Job) -> ImageOutcome:
        assert job.job_id is not None
        state = self.service.state(job.job_id)
        if state.status == "IN_PROGRESS":
            return video_waiting(self.video, self._next_look(job))
        if state.status != "SUCCEEDED":
            message = state.message or "Rekognition Video could not analyse the video"
            self.jobs.fail(self.token, self.video.id, job, "VideoJobFailed", message)
            raise VideoJobFailedError(message)
        merger = Merger(round(1000 * self.settings.video_gap_seconds))
        for seen in self.service.detections(job.job_id):
            merger.add(
                seen.timestamp_ms, seen.name, seen.person_id, seen.confidence, seen.box, seen.urls, seen.known_gender
            )
        duration_ms = state.duration_ms or job.duration_ms
        found = {
            "appearances": [a.to_json() for a in merger.appearances()],
            "duration_ms": duration_ms,
            "width": state.width,
            "height": state.height,
        }
        if not self.jobs.finish(self.token, self.video.id, job, found, duration_ms):
            return video_waiting(self.video, 0)  # another run moved the job on: look again
        return video_done(self.video, found)

    def _next_look(self, job: Job) -> float:
        """When to look at a running job again: a quarter of its age, between the poll settings;
        with completion messages, only after the longest wait (the message makes it due first)."""
        settings = self.settings
        if settings.video_completions_queue_url:
            return settings.video_poll_max_seconds
        age = (utcnow() - aware_utc(job.started_at)).total_seconds()
        return min(settings.video_poll_max_seconds, max(settings.video_poll_seconds, age / 4))


def notification_channel(settings: Settings) -> dict[str, str] | None:
    if settings.video_sns_topic_arn and settings.video_sns_role_arn:
        return {"SNSTopicArn": settings.video_sns_topic_arn, "RoleArn": settings.video_sns_role_arn}
    return None


def _md5(ranges: ByteRanges, chunk: int = 8 * 1024 * 1024) -> str:
    """The MD5 of a local file's bytes (its identity: a copy under another name has the same)."""
    digest = hashlib.md5(usedforsecurity=False)
    for start in range(0, ranges.size, chunk):
        digest.update(ranges.read(start, chunk))
    return digest.hexdigest()
