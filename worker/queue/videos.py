"""A video's job: the work on one video's bytes with one backend, which outlives the runs that
advance it, and every transition of it.

    (none) ──open by T──▶ running ──record JobId by T──▶ running, JobId known ──finish by T──▶ succeeded
                 │           │  ▲                                             └──fail by T────▶ failed
                 │           │  └── save a slice by T (local: position, appearances so far)
                 │           └──give back by T (the service's quota was full, or the start failed for now)──▶ idle
                 └── idle ──open by T──▶ running (the same token: a start lost in flight is found again)
    succeeded | failed ──open by T of a --force scan──▶ running (generation + 1: a new token, a new job)

A video item is a row of ``images`` like any image (``worker/queue/images.py``): listed, claimed by
a run ``T``, started, and written ``done`` or ``failed``, or deferred until ``not_before`` while its
job runs. Its job is a row of ``video_jobs``, one per backend and bytes (an S3 ETag as listed, or a
local file's MD5, and the size): every row of those bytes under any key follows the one job, so a
video is started, paid for or worked on once. Each transition below is one guarded statement (or
one transaction) naming the claim token ``T`` that may make it: ``T`` must hold a row of the
video (``status = 'queued' AND claimed_by = T``), and a job is named by its ``request_token``,
which changes with each generation, so a late holder changes nothing.

**No crash window between starting a Rekognition Video job and recording it.** The job's row, with
its ``ClientRequestToken`` (derived from the bytes, where they are read and the generation), is
committed before the call; a run that dies after the call and before recording the JobId leaves a
running job without one, and the next run calls ``StartCelebrityRecognition`` again with the same
token: the service answers the same JobId, and nothing is started or paid twice.

**Concurrent jobs are paced fleet-wide**: a job is opened only while fewer than the quota
(``CELEBSCAN_REKOGNITION_VIDEO_JOBS``) run, counted under a lock (PostgreSQL: an advisory lock;
SQLite: its write lock); a video that finds them all taken waits, and the run that ends a job
hands its place to the next waiting video of its scan in the same transaction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, and_, exists, func, select, tuple_, update

from worker.database import aware_utc, utcnow
from worker.media.video import VIDEO
from worker.outcomes import QueuedImage
from worker.queue.images import held_by
from worker.recognizers.rekognition_video import request_token
from worker.retry import retry_database
from worker.schema import QUEUED, images, scans, video_jobs
from worker.sql import dialect_insert

IDLE, RUNNING, SUCCEEDED, FAILED = "idle", "running", "succeeded", "failed"
#: The PostgreSQL advisory lock (an arbitrary constant: "celev") under which jobs are counted and opened.
JOBS_LOCK = 0x63656C6576
#: Why :meth:`VideoJobs.open` opened nothing.
WAIT_SLOT, WAIT_BUDGET, NOT_HELD = "slot", "budget", "not held"
#: The code a video left for ``--resume`` carries (the ``--max-cost`` budget left did not pay for it).
OVER_BUDGET = "OverBudget"


@dataclass(frozen=True)
class Job:
    id: int
    backend: str
    content_key: str
    size: int
    bucket: str
    key: str
    scan_id: int | None
    image_id: int | None
    status: str
    request_token: str
    job_id: str | None
    generation: int
    started_at: datetime
    duration_ms: int | None
    position_ms: int
    progress: Any
    result: Any
    error_code: str | None
    error_message: str | None
    budget_images: int

    @classmethod
    def of(cls, row) -> Job:
        return cls(**{name: getattr(row, name) for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Opened:
    """What :meth:`VideoJobs.open` found: the video's job (started now, or before), or why none."""

    job: Job | None
    waiting: str | None = None  # WAIT_SLOT, WAIT_BUDGET or NOT_HELD when ``job`` is None


def _holds(token: str, image_id: int):
    """The fence: run ``token`` still holds the video's row ``image_id``."""
    return exists().where(images.c.id == image_id, held_by(token))


class VideoJobs:
    """The ``video_jobs`` table: every transition of a video's job, each one guarded statement."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def find(self, backend: str, content_key: str, size: int) -> Job | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(video_jobs).where(*_of_bytes(backend, content_key, size))).one_or_none()
        return None if row is None else Job.of(row)

    @retry_database
    def open(
        self,
        token: str,
        video: QueuedImage,
        content_key: str,
        duration_ms: int | None,
        *,
        quota: int | None = None,
        cost_usd: float = 0.0,
    ) -> Opened:
        """The job of ``video``'s bytes for the run ``token`` (which holds the video): the one that
        runs or ended already (a --force scan opens a new generation of one that ended before the
        scan began: one made since is its result too, as a picture's is), or a new
        one, ``running``, when ``quota`` (None: no limit) leaves room and the scan's ``--max-cost``
        budget pays ``cost_usd``; an ``idle`` job (its start was given back) opens again as it was.
        """
        now = utcnow()
        with self.engine.begin() as conn:
            _lock(conn, video.scan_id, counted=quota is not None)
            if conn.execute(select(_holds(token, video.id))).scalar() is not True:
                return Opened(None, NOT_HELD)
            row = conn.execute(
                _for_update(conn, select(video_jobs).where(*_of_bytes(video.backend, content_key, video.size)))
            ).one_or_none()
            redo = row is not None and row.status in (SUCCEEDED, FAILED) and not video.reuse_results
            redo = redo and row is not None and row.scan_id != video.scan_id and _ended_before_scan(conn, row, video)
            if row is not None and row.status != IDLE and not redo:
                return Opened(Job.of(row))
            running = _running(conn, video.backend) if quota is not None else 0
            if quota is not None and running >= quota:
                return Opened(None, WAIT_SLOT)
            charged = _charge(conn, video.scan_id, cost_usd)
            if charged is None:
                _leave_for_resume(conn, token, video)
                return Opened(None, WAIT_BUDGET)
            values: dict[str, Any] = dict(
                status=RUNNING, started_at=now, finished_at=None, budget_images=charged, scan_id=video.scan_id
            )
            if row is None or redo:
                generation = 0 if row is None else row.generation + 1
                values.update(
                    bucket=video.bucket,
                    key=video.key,
                    image_id=video.id,
                    generation=generation,
                    request_token=request_token(content_key, video.size, video.bucket, video.key, generation),
                    job_id=None,
                    duration_ms=duration_ms,
                    position_ms=0,
                    progress=None,
                    result=None,
                    error_code=None,
                    error_message=None,
                )
            if row is None:
                conn.execute(
                    dialect_insert(self.engine, video_jobs)
                    .values(backend=video.backend, content_key=content_key, size=video.size, **values)
                    .on_conflict_do_nothing()
                )
            else:
                conn.execute(
                    update(video_jobs)
                    .where(video_jobs.c.id == row.id, video_jobs.c.request_token == row.request_token)
                    .values(**values)
                )
            opened = conn.execute(select(video_jobs).where(*_of_bytes(video.backend, content_key, video.size))).one()
            if quota is not None and running + 1 < quota:  # places are still free: the next waiting video takes one
                _wake_waiting_for_a_place(conn, video.backend, video.scan_id, now)
        return Opened(Job.of(opened))

    @retry_database
    def record_job_id(self, token: str, video_id: int, job: Job, job_id: str) -> bool:
        """Keep the JobId the service gave ``job``'s start (the first start, or one repeated with
        its token after a crash: the same JobId)."""
        with self.engine.begin() as conn:
            return bool(
                conn.execute(
                    update(video_jobs)
                    .where(_this_generation(job), video_jobs.c.status == RUNNING, _holds(token, video_id))
                    .where(video_jobs.c.job_id.is_(None) | (video_jobs.c.job_id == job_id))
                    .values(job_id=job_id)
                ).rowcount
            )

    @retry_database
    def give_back(self, token: str, video_id: int, job: Job) -> bool:
        """The job's start was refused for now (the service's quota was full, or it failed in a way
        worth trying again): ``idle``, its place and its budget given back, its token kept."""
        with self.engine.begin() as conn:
            changed = conn.execute(
                update(video_jobs)
                .where(
                    _this_generation(job),
                    video_jobs.c.status == RUNNING,
                    video_jobs.c.job_id.is_(None),
                    _holds(token, video_id),
                )
                .values(status=IDLE, budget_images=0)
            ).rowcount
            if changed and job.budget_images and job.scan_id is not None:
                conn.execute(
                    update(scans)
                    .where(scans.c.id == job.scan_id)
                    .values(handed_out=scans.c.handed_out - job.budget_images)
                )
        return bool(changed)

    @retry_database
    def save_progress(self, token: str, video_id: int, job: Job, position_ms: int, progress: Any) -> bool:
        """A local job's slice: the frames up to ``position_ms`` recognized, and the appearances so far
        (only from where ``job`` was: a slice worked twice is saved once)."""
        with self.engine.begin() as conn:
            return bool(
                conn.execute(
                    update(video_jobs)
                    .where(
                        _this_generation(job),
                        video_jobs.c.status == RUNNING,
                        video_jobs.c.position_ms == job.position_ms,
                        _holds(token, video_id),
                    )
                    .values(position_ms=position_ms, progress=progress)
                ).rowcount
            )

    @retry_database
    def finish(self, token: str, video_id: int, job: Job, result: Any, duration_ms: int | None = None) -> bool:
        """The job succeeded: its ``result`` (the appearances) kept for every row of its bytes, and
        its place handed to the next video of its scan waiting for one. True also when it was
        finished already (a replay)."""
        return self._end(token, video_id, job, dict(status=SUCCEEDED, result=result), duration_ms)

    @retry_database
    def fail(self, token: str, video_id: int, job: Job, code: str, message: str) -> bool:
        """The job failed: every row of its bytes fails with ``code``; its place is handed on."""
        return self._end(token, video_id, job, dict(status=FAILED, error_code=code, error_message=message[:2000]))

    def _end(self, token: str, video_id: int, job: Job, values: dict, duration_ms: int | None = None) -> bool:
        now = utcnow()
        if duration_ms is not None:
            values["duration_ms"] = duration_ms
        with self.engine.begin() as conn:
            ended = conn.execute(
                update(video_jobs)
                .where(_this_generation(job), video_jobs.c.status == RUNNING, _holds(token, video_id))
                .values(finished_at=now, **values)
            ).rowcount
            if ended and job.scan_id is not None:
                _wake_waiting_for_a_place(conn, job.backend, job.scan_id, now)
            if not ended:
                status = conn.execute(select(video_jobs.c.status).where(_this_generation(job))).scalar()
                return status == values["status"]
        return True

    @retry_database
    def wake(self, job_ids: Sequence[str]) -> int:
        """The jobs ended (their completion messages said so): the rows that follow them and wait
        for their next look, nobody holding them, are due now."""
        if not job_ids:
            return 0
        now = utcnow()
        following = select(video_jobs.c.backend, video_jobs.c.content_key, video_jobs.c.size).where(
            video_jobs.c.job_id.in_(list(job_ids))
        )
        with self.engine.begin() as conn:
            return conn.execute(
                update(images)
                .where(
                    tuple_(images.c.backend, images.c.etag, images.c.size).in_(following),
                    _waiting(now),
                )
                .values(not_before=now)
            ).rowcount

    def left_for_resume(self, scan_id: int) -> int:
        """The scan's videos the ``--max-cost`` budget did not pay for (``scan --resume`` hands them out)."""
        with self.engine.connect() as conn:
            return conn.execute(
                select(func.count()).where(
                    images.c.scan_id == scan_id, images.c.status == QUEUED, images.c.error_code == OVER_BUDGET
                )
            ).scalar_one()

    @retry_database
    def price_budget(self, scan_id: int, unit_usd: float | None) -> None:
        """``--max-cost``: what one image of the scan's budget is worth, for its videos (see :func:`_charge`)."""
        with self.engine.begin() as conn:
            conn.execute(update(scans).where(scans.c.id == scan_id).values(budget_unit_usd=unit_usd))

    def figures(self, scan_id: int | None = None) -> JobFigures:
        """Jobs running (the fleet's, and the scan's) and the video minutes the scan's jobs bill."""
        with self.engine.connect() as conn:
            return job_figures(conn, scan_id)


@dataclass(frozen=True)
class JobFigures:
    running: int  # Rekognition Video jobs running now, fleet-wide (what the quota counts)
    running_here: int  # of those, the scan's
    started_ms: int  # the length of the videos the scan's Rekognition Video jobs were started on


def job_figures(conn, scan_id: int | None) -> JobFigures:
    paid = video_jobs.c.backend == "rekognition"
    running = conn.execute(select(func.count()).where(paid, video_jobs.c.status == RUNNING)).scalar_one()
    if scan_id is None:
        return JobFigures(running, running, 0)
    here, started = conn.execute(
        select(
            func.count().filter(video_jobs.c.status == RUNNING),
            func.coalesce(func.sum(video_jobs.c.duration_ms).filter(video_jobs.c.job_id.is_not(None)), 0),
        ).where(paid, video_jobs.c.scan_id == scan_id)
    ).one()
    return JobFigures(running, int(here), int(started))


def known_video_jobs(engine: Engine, backend: str, videos: Sequence[tuple[str, int]]) -> set[tuple[str, int]]:
    """Of the given (ETag, size) pairs, those whose job with ``backend`` succeeded: a copy is free."""
    keys = sorted({content_key for content_key, _ in videos})
    if not keys:
        return set()
    with engine.connect() as conn:
        rows = conn.execute(
            select(video_jobs.c.content_key, video_jobs.c.size).where(
                video_jobs.c.backend == backend,
                video_jobs.c.content_key.in_(keys),
                video_jobs.c.status == SUCCEEDED,
            )
        )
        found = {(row.content_key, row.size) for row in rows}
    return found & set(videos)


def budget_images_for(cost_usd: float, unit_usd: float | None) -> int:
    """How many images of a ``--max-cost`` budget a video of ``cost_usd`` takes: the budget's last
    images cost ``unit_usd`` each (the cheapest tier it reached), so giving up this many of them
    pays for the video and the budget is never overspent."""
    if not unit_usd or cost_usd <= 0:
        return 0
    return math.ceil(cost_usd / unit_usd - 1e-9)


def _of_bytes(backend: str, content_key: str, size: int):
    return (video_jobs.c.backend == backend, video_jobs.c.content_key == content_key, video_jobs.c.size == size)


def _this_generation(job: Job):
    return and_(video_jobs.c.id == job.id, video_jobs.c.request_token == job.request_token)


def _for_update(conn, query):
    return query.with_for_update() if conn.dialect.name == "postgresql" else query


def _ended_before_scan(conn, job, video: QueuedImage) -> bool:
    """Whether ``job`` ended before ``video``'s scan began (a --force scan does such a job again)."""
    began = conn.execute(select(scans.c.created_at).where(scans.c.id == video.scan_id)).scalar_one()
    return job.finished_at is None or aware_utc(job.finished_at) < aware_utc(began)


def _lock(conn, scan_id: int, counted: bool) -> None:
    """Serialize the opening of jobs: those that are counted against a quota fleet-wide."""
    if conn.dialect.name == "postgresql":
        if counted:
            conn.execute(select(func.pg_advisory_xact_lock(JOBS_LOCK)))
    else:  # SQLite's write lock first, so what is counted below stays true
        conn.execute(update(scans).where(scans.c.id == scan_id).values(listed=scans.c.listed))


def _running(conn, backend: str) -> int:
    """The fleet's jobs running that a queued video still follows. A job whose videos all ended
    (failed while it ran: quarantined, given up on) has nobody to look at it again: counted, it
    would hold its place for ever. It ends at the service by itself, and a start past the account's
    real quota is refused there (LimitExceededException: the video waits)."""
    followed = exists().where(
        images.c.status == QUEUED,
        images.c.media == VIDEO,
        images.c.backend == video_jobs.c.backend,
        images.c.etag == video_jobs.c.content_key,
        images.c.size == video_jobs.c.size,
    )
    return conn.execute(
        select(func.count()).where(video_jobs.c.backend == backend, video_jobs.c.status == RUNNING, followed)
    ).scalar_one()


def _charge(conn, scan_id: int, cost_usd: float) -> int | None:
    """Take a video's cost out of the scan's ``--max-cost`` budget (in images at the budget's last
    price; its claim counted one already): the images taken, or None when the budget left does not
    pay for it (the budget then ends there, :func:`_leave_for_resume`)."""
    budget, handed, unit = conn.execute(
        _for_update(
            conn,
            select(scans.c.budget_images, scans.c.handed_out, scans.c.budget_unit_usd).where(scans.c.id == scan_id),
        )
    ).one()
    if budget is None:
        return 0
    taken = max(0, budget_images_for(cost_usd, unit) - 1)
    if handed + taken > budget:
        return None
    if taken:
        conn.execute(update(scans).where(scans.c.id == scan_id).values(handed_out=scans.c.handed_out + taken))
    return taken


def _leave_for_resume(conn, token: str, video: QueuedImage) -> None:
    """The budget left does not pay for the video: given back as if never handed out (its claim's
    count of the budget too), so the budget is spent and the window ends; ``scan --resume
    --max-cost`` hands it out again. Its code says why it waits."""
    released = conn.execute(
        update(images)
        .where(images.c.id == video.id, held_by(token))
        .values(
            claimed_by=None,
            claimed_at=None,
            started_by=None,
            attempts=images.c.attempts - 1,
            not_before=None,
            error_code=OVER_BUDGET,
            error_message=(
                "the --max-cost budget left does not pay for this video: "
                f"celebscan scan --resume {video.scan_id} --max-cost USD hands it out again"
            ),
        )
    ).rowcount
    if released:
        conn.execute(
            update(scans)
            .where(scans.c.id == video.scan_id, scans.c.budget_images.is_not(None))
            .values(handed_out=scans.c.handed_out - 1, budget_images=scans.c.handed_out - 1)
        )


def _waiting(now: datetime):
    """A video row nobody holds that waits for a later look."""
    return and_(
        images.c.status == QUEUED,
        images.c.media == "video",
        images.c.claimed_by.is_(None),
        images.c.not_before > now,
    )


def _wake_waiting_for_a_place(conn, backend: str, scan_id: int, now: datetime) -> None:
    """The first video of the scan that waits for a job to be opened (its bytes have none running or
    ended) is due now: it takes the place a job just left."""
    video = images.alias("video")  # not the updated row: the first waiting one
    has_job = exists().where(
        video_jobs.c.backend == video.c.backend,
        video_jobs.c.content_key == video.c.etag,
        video_jobs.c.size == video.c.size,
        video_jobs.c.status != IDLE,
    )
    waiting = (
        select(video.c.id)
        .where(
            video.c.scan_id == scan_id,
            video.c.backend == backend,
            video.c.status == QUEUED,
            video.c.media == "video",
            video.c.claimed_by.is_(None),
            video.c.not_before > now,
            video.c.error_code.is_(None),
            ~has_job,
        )
        .order_by(video.c.id)
        .limit(1)
    )
    if conn.dialect.name == "postgresql":  # two jobs ending at once wake two videos, not one twice
        waiting = waiting.with_for_update(skip_locked=True, of=video)
    first = conn.execute(waiting).scalar()
    if first is not None:
        conn.execute(update(images).where(images.c.id == first, _waiting(now)).values(not_before=now))
