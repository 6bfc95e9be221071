"""Writing result records as JSON Lines or CSV (one record per image)."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable
from typing import Any, TextIO

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
)


def write_jsonl(records: Iterable[dict[str, Any]], out: TextIO) -> int:
    count = 0
    for record in records:
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        count += 1
    return count


def write_csv(records: Iterable[dict[str, Any]], out: TextIO) -> int:
    """Flat columns; ``people`` is the names joined by ``;``, the face lists are JSON."""
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    count = 0
    for record in records:
        error = record["error"] or {}
        writer.writerow(
            {
                **{column: record[column] for column in CSV_COLUMNS[:5]},
                "error_code": error.get("code"),
                "error_message": error.get("message"),
                "backend": record["backend"],
                "width": record["width"],
                "height": record["height"],
                "people": ";".join(c["name"] for c in record["celebrities"]),
                "celebrities": json.dumps(record["celebrities"], ensure_ascii=False),
                "unrecognized_faces": json.dumps(record["unrecognized_faces"]),
            }
        )
        count += 1
    return count


WRITERS: dict[str, Callable[[Iterable[dict[str, Any]], TextIO], int]] = {"jsonl": write_jsonl, "csv": write_csv}
