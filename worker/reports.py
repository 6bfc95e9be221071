"""Reading results back: scan summaries, progress for monitoring, and one record per image."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from worker.database import aware_utc
from worker.results import BoundingBox
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
    #: Queued images whose last try ended in a transient error, by its code: they are tried again.
    retrying: dict[str, int] = field(default_factory=dict)
    #: Why workers hand this scan's batches back (none could run its recognizer), while none is served.
    unserved: str | None = None
    #: "listing" while the source is being listed, "listed" after, "listing failed" (see listing_error).
    listing: str = "listed"
    listing_error: str | None = None

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


def listing_state(scan) -> str:
    if scan.listing_error:
        return "listing failed"
    # scans made before listing_finished_at existed were listed in full before anything ran
    return "listed" if scan.listing_finished_at or scan.finished_at else "listing"


def unserved_reason(scan, last_processed_at: datetime | None, queued: int) -> str | None:
    """Why a worker handed this scan's batches back, unless an image was processed since."""
    if not queued or scan.unserved_at is None:
        return None
    if last_processed_at is not None and aware_utc(last_processed_at) > aware_utc(scan.unserved_at):
        return None
    return scan.unserved_reason


def _stored_box(face) -> dict[str, float]:
    return BoundingBox(face.box_left, face.box_top, face.box_width, face.box_height).to_dict()


def result_record(row, face_rows) -> dict[str, Any]:
    error = {"code": row.error_code, "message": row.error_message} if row.status == FAILED else None
    return {
        "scan_id": row.scan_id,
        "source": row.source,
        "key": row.key,
        "etag": row.etag,
        "status": row.status,
        "error": error,
        "backend": row.backend,
        "width": row.width,
        "height": row.height,
        "celebrities": [
            {
                "name": f.name,
                "id": f.person_id,
                "match_confidence": round(f.match_confidence, 2),
                "bounding_box": _stored_box(f),
                "urls": f.urls or [],
            }
            for f in face_rows
            if f.name is not None
        ],
        "unrecognized_faces": [
            {"bounding_box": _stored_box(f), "confidence": round(f.face_confidence or 0.0, 2)}
            for f in face_rows
            if f.name is None
        ],
    }
