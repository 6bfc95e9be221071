"""The read side's types: what reading results back yields (the queries are in ``worker/findings.py``
and ``worker/store.py``).

A scan's summary (``status``, ``scan``'s last line), its progress by status (``metrics``, scaling),
and one typed record per image (``results``, ``report``, ``show``), whose ``to_dict()`` is the JSON
line ``results --format jsonl`` writes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from worker.database import aware_utc
from worker.queue.slots import WindowState
from worker.recognition import BoundingBox
from worker.schema import DONE, FAILED, QUEUED


@dataclass(frozen=True)
class ScanSummary:
    id: int
    source: str
    backend: str
    created_at: datetime
    finished_at: datetime | None
    listed: int
    skipped: int
    counts: dict[str, int]
    faces: int
    people: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    last_processed_at: datetime | None = None
    paid_calls: int = 0
    calls_saved: int = 0
    #: Images that copied the known result of the same picture (under another key) instead of a call.
    reused: int = 0
    #: Queued images whose last try ended in a transient error, by its code: they are tried again.
    retrying: dict[str, int] = field(default_factory=dict)
    #: Why workers hand this scan's batches back (none could run its recognizer), while none is served.
    unserved: str | None = None
    #: "listing" while the source is being listed, "listed" after, "listing failed" (see listing_error);
    #: "following" while a standing scan's follower records its bucket's events.
    listing: str = "listed"
    listing_error: str | None = None
    #: (parts ended, parts) of the source's listing; None when one process read it whole (an inventory).
    listing_parts: tuple[int, int] | None = None
    #: Listed images left to another scan that holds them in flight (recognized once, there).
    held_elsewhere: int = 0
    #: Images a later scan took over from this one (queued ones nobody held, failures it retried,
    #: --force): so listed = skipped + held_elsewhere + images in the scan + handed_over.
    handed_over: int = 0
    #: Late writes refused because their run had lost its claim (their paid calls are counted).
    refused_writes: int = 0
    #: When a lister last recorded a page of a part still to list (None: none did yet).
    listing_active_at: datetime | None = None
    #: A standing scan (``celebscan follow``): when a follower last renewed it, the S3 events it
    #: recorded, those that deleted an object, and its images whose object is deleted.
    standing: bool = False
    followed_at: datetime | None = None
    events: int = 0
    deletions: int = 0
    deleted: int = 0
    #: With a broker: the scan's window slots by state (worker/queue/slots.py), and when the
    #: fleet's window keeper last renewed its lease (None: no worker ever kept it).
    window: WindowState | None = None
    keeper_at: datetime | None = None
    #: Of the scan's items, its videos by status (counted in ``counts`` too), the videos each person
    #: appears in, its Rekognition Video jobs running (and the fleet's, what the quota counts) and
    #: the minutes of video its jobs were started on (what they bill).
    videos: dict[str, int] = field(default_factory=dict)
    people_in_videos: dict[str, int] = field(default_factory=dict)
    video_jobs_running: int = 0
    video_jobs_running_fleet: int = 0
    video_minutes: float = 0.0

    @property
    def processed(self) -> int:
        return self.counts[DONE] + self.counts[FAILED]

    @property
    def rate(self) -> float | None:
        """Images per second since the scan was created, or None before the first result."""
        if not self.processed or self.last_processed_at is None:
            return None
        seconds = (aware_utc(self.last_processed_at) - aware_utc(self.created_at)).total_seconds()
        return self.processed / seconds if seconds > 0 else None

    @property
    def eta_seconds(self) -> float | None:
        rate = self.rate
        return self.counts[QUEUED] / rate if rate else None


@dataclass(frozen=True)
class ScanProgress:
    """Images of one scan by status: what monitoring exports and scaling reads."""

    scan_id: int
    finished: bool
    counts: dict[str, int]
    last_processed_at: datetime | None
    unserved: str | None = None  # why workers hand its batches back, while none is served
    window: WindowState | None = None  # an unfinished scan's window slots (None: it has none)

    @property
    def stalled(self) -> bool:
        """Unfinished, and no window slot of it left: nothing moves it on but ``scan --resume``."""
        return not self.finished and (self.window is None or self.window.ended == self.window.size)


def listing_state(scan) -> str:
    if scan.listing_error:
        return "listing failed"
    if scan.standing and not scan.listing_finished_at:
        return "following"
    # scans made before listing_finished_at existed were listed in full before anything ran
    return "listed" if scan.listing_finished_at or scan.finished_at else "listing"


def unserved_reason(scan, last_processed_at: datetime | None, queued: int) -> str | None:
    """Why a worker handed this scan's batches back, unless an image was processed since."""
    if not queued or scan.unserved_at is None:
        return None
    if last_processed_at is not None and aware_utc(last_processed_at) > aware_utc(scan.unserved_at):
        return None
    return scan.unserved_reason


@dataclass(frozen=True)
class FoundCelebrity:
    """A recognized face in a stored result."""

    name: str
    id: str | None
    match_confidence: float
    bounding_box: BoundingBox
    urls: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "id": self.id,
            "match_confidence": self.match_confidence,
            "bounding_box": self.bounding_box.to_dict(),
            "urls": list(self.urls),
        }


@dataclass(frozen=True)
class UnknownFace:
    """A face that was found and not recognized."""

    bounding_box: BoundingBox
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        return {"bounding_box": self.bounding_box.to_dict(), "confidence": self.confidence}


@dataclass(frozen=True)
class VideoAppearance:
    """A person in a stored video's result: when they are seen, how surely, and their best frame."""

    name: str
    id: str | None
    match_confidence: float
    ranges: tuple[tuple[float, float], ...]  # (start, end) in seconds from the video's start
    detections: int
    frame_seconds: float  # the representative frame: the best match
    bounding_box: BoundingBox  # the face in that frame
    urls: tuple[str, ...] = ()

    @property
    def seconds(self) -> float:
        """How long they are seen: the ranges' lengths added."""
        return round(sum(end - start for start, end in self.ranges), 3)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "id": self.id,
            "match_confidence": self.match_confidence,
            "ranges": [{"start": start, "end": end} for start, end in self.ranges],
            "seconds": self.seconds,
            "detections": self.detections,
            "frame": {"timestamp": self.frame_seconds, "bounding_box": self.bounding_box.to_dict()},
            "urls": list(self.urls),
        }


@dataclass(frozen=True)
class ImageError:
    """Why an image could not be read: a stable code (docs/operations.md's bad-input table) and a message."""

    code: str
    message: str


@dataclass(frozen=True)
class ResultRecord:
    """One image's result as ``celebscan results`` gives it (docs/guide.md's result record)."""

    scan_id: int
    source: str
    key: str
    etag: str
    status: str
    error: ImageError | None
    backend: str
    width: int | None
    height: int | None
    celebrities: tuple[FoundCelebrity, ...] = ()
    unrecognized_faces: tuple[UnknownFace, ...] = ()
    #: When its followed bucket said the object was deleted (shown only with --include-deleted).
    deleted_at: datetime | None = None
    #: "video" for a video, whose result is its appearances (``celebrities`` then has each person
    #: once, with their best confidence and the box of their representative frame); None: an image.
    media: str | None = None
    duration_seconds: float | None = None
    appearances: tuple[VideoAppearance, ...] = ()

    @property
    def is_video(self) -> bool:
        return self.media == "video"

    @property
    def names(self) -> list[str]:
        """The people recognized in the image, each once, sorted."""
        return sorted({celebrity.name for celebrity in self.celebrities})

    def to_dict(self) -> dict[str, Any]:
        """The record in the JSON shape of ``results --format jsonl``."""
        error = {"code": self.error.code, "message": self.error.message} if self.error else None
        deleted = {"deleted_at": aware_utc(self.deleted_at).isoformat()} if self.deleted_at else {}
        return {
            "scan_id": self.scan_id,
            "source": self.source,
            "key": self.key,
            "etag": self.etag,
            "status": self.status,
            "error": error,
            "backend": self.backend,
            "width": self.width,
            "height": self.height,
            "celebrities": [celebrity.to_dict() for celebrity in self.celebrities],
            "unrecognized_faces": [face.to_dict() for face in self.unrecognized_faces],
            **(self._video_fields() if self.is_video else {}),
            **deleted,
        }

    def _video_fields(self) -> dict[str, Any]:
        return {
            "media": "video",
            "duration_seconds": self.duration_seconds,
            "appearances": [appearance.to_dict() for appearance in self.appearances],
        }


def _stored_box(face) -> BoundingBox:
    return BoundingBox(face.box_left, face.box_top, face.box_width, face.box_height)


def _seconds(milliseconds: int) -> float:
    return round(milliseconds / 1000, 3)


def video_appearance(row) -> VideoAppearance:
    """A stored appearance (a row of ``appearances``) as the read side gives it."""
    return VideoAppearance(
        name=row.name,
        id=row.person_id,
        match_confidence=round(row.match_confidence, 2),
        ranges=tuple((_seconds(start), _seconds(end)) for start, end in row.ranges),
        detections=row.detections,
        frame_seconds=_seconds(row.frame_ms),
        bounding_box=BoundingBox(row.box_left, row.box_top, row.box_width, row.box_height),
        urls=tuple(row.urls or ()),
    )


def result_record(row, face_rows, appearance_rows=()) -> ResultRecord:
    """The record of an image row (joined with its scan's source) and its face rows; a video's,
    with its appearance rows."""
    if row.media == "video":
        found = tuple(video_appearance(a) for a in appearance_rows)
        return dataclasses.replace(
            _image_record(row, ()),
            media="video",
            duration_seconds=_seconds(row.duration_ms) if row.duration_ms is not None else None,
            appearances=found,
            celebrities=tuple(FoundCelebrity(a.name, a.id, a.match_confidence, a.bounding_box, a.urls) for a in found),
        )
    return _image_record(row, face_rows)


def _image_record(row, face_rows) -> ResultRecord:
    failed = row.status == FAILED
    return ResultRecord(
        scan_id=row.scan_id,
        source=row.source,
        key=row.key,
        etag=row.etag,
        status=row.status,
        error=ImageError(row.error_code or "", row.error_message or "") if failed else None,
        backend=row.backend,
        width=row.width,
        height=row.height,
        celebrities=tuple(
            FoundCelebrity(f.name, f.person_id, round(f.match_confidence, 2), _stored_box(f), tuple(f.urls or ()))
            for f in face_rows
            if f.name is not None
        ),
        unrecognized_faces=tuple(
            UnknownFace(_stored_box(f), round(f.face_confidence or 0.0, 2)) for f in face_rows if f.name is None
        ),
        deleted_at=row.deleted_at,
    )
