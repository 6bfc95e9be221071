"""Rekognition Video's completion messages: SNS → SQS → the videos of the finished jobs made due.

A job's end is published to the SNS topic its start named; the SQS queue subscribed to it
(``celebscan video-jobs --setup``) holds the messages. A worker process, at most four times a
second and only while jobs run, takes up to ten of them without waiting, makes the videos that follow
those jobs due at once (``worker/queue/videos.py``), and deletes the messages once that is
committed. A message delivered twice makes them due twice, which changes nothing; a message lost
costs only time: every video still looks at its job after ``CELEBSCAN_VIDEO_POLL_MAX_SECONDS``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from sqlalchemy import Engine

from worker import clock
from worker.aws import AWS_ERRORS, client
from worker.queue.videos import VideoJobs
from worker.recognizers.rekognition_video import completion
from worker.settings import Settings

log = logging.getLogger(__name__)

#: A worker process looks at the completion queue at most this often.
RECEIVE_EVERY_SECONDS = 0.25


@dataclass
class CompletionReader:
    """A worker process's reader of the completion queue (its SQS client built on first use)."""

    _sqs: object = field(default=None, repr=False)
    _last: float = float("-inf")
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def wake_finished(self, settings: Settings | None, engine: Engine) -> int:
        """Read what the queue holds now (when it is time, and jobs run) and make those jobs'
        videos due; how many were. Never raises: the videos look at their jobs in time anyway."""
        if settings is None or not settings.video_completions_queue_url:
            return 0
        with self._lock:
            now = clock.monotonic()
            if now - self._last < RECEIVE_EVERY_SECONDS:
                return 0
            self._last = now
        try:
            jobs = VideoJobs(engine)
            if not jobs.figures().running:
                return 0
            return self.receive(settings, jobs)
        except Exception as exc:  # SQS or the database away: the jobs are looked at after the longest wait
            log.warning("could not read Rekognition Video's completion messages: %s", exc)
            return 0

    def receive(self, settings: Settings, jobs: VideoJobs, wait_seconds: int = 0) -> int:
        """One receive: up to ten messages, their jobs' videos made due, then the messages deleted."""
        if self._sqs is None:
            self._sqs = client("sqs", settings)
        sqs = self._sqs
        url = settings.video_completions_queue_url
        try:
            messages = sqs.receive_message(  # type: ignore[attr-defined]
                QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=wait_seconds
            ).get("Messages", [])
        except AWS_ERRORS as exc:
            log.warning("could not receive from %s: %s", url, exc)
            return 0
        ended = [found[0] for message in messages if (found := completion(message.get("Body", ""))) is not None]
        woken = jobs.wake(ended)
        if messages:
            entries = [{"Id": str(n), "ReceiptHandle": m["ReceiptHandle"]} for n, m in enumerate(messages)]
            try:
                sqs.delete_message_batch(QueueUrl=url, Entries=entries)  # type: ignore[attr-defined]
            except AWS_ERRORS as exc:  # they come back and wake their videos again: harmless
                log.warning("could not delete %d completion messages: %s", len(entries), exc)
        return woken
