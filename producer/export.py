"""Writing result records as JSON Lines or CSV (one record per image or video)."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable
from typing import TextIO

from worker.read_models import ResultRecord

CSV_COLUMNS = (
    "scan_id",
    "source",
    "key",
    "etag",
    "status",
    "error_code",
    "error_message",
    "backend",
    "width",
    "height",
    "people",
    "celebrities",
    "unrecognized_faces",
    "media",
    "duration_seconds",
    "appearances",
)


def write_jsonl(records: Iterable[ResultRecord], out: TextIO) -> int:
    count = 0
    for record in records:
        out.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")
        count += 1
    return count


def write_csv(records: Iterable[ResultRecord], out: TextIO) -> int:
    """Flat columns; ``people`` is the names joined by ``;``, the face lists and a video's
    appearances are JSON."""
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    count = 0
    for record in records:
        writer.writerow(
            {
                "scan_id": record.scan_id,
                "source": record.source,
                "key": record.key,
                "etag": record.etag,
                "status": record.status,
                "error_code": record.error.code if record.error else None,
                "error_message": record.error.message if record.error else None,
                "backend": record.backend,
                "width": record.width,
                "height": record.height,
                "people": ";".join(c.name for c in record.celebrities),
                "celebrities": json.dumps([c.to_dict() for c in record.celebrities], ensure_ascii=False),
                "unrecognized_faces": json.dumps([f.to_dict() for f in record.unrecognized_faces]),
                "media": record.media or "image",
                "duration_seconds": record.duration_seconds,
                "appearances": json.dumps([a.to_dict() for a in record.appearances], ensure_ascii=False)
                if record.is_video
                else None,
            }
        )
        count += 1
    return count


WRITERS: dict[str, Callable[[Iterable[ResultRecord], TextIO], int]] = {"jsonl": write_jsonl, "csv": write_csv}
