"""Reading an S3 Inventory report instead of listing the bucket.

For buckets too big to list often, S3 Inventory writes a daily or weekly report: a
``manifest.json`` naming the source bucket, the columns (``fileSchema``) and the data files, each a
gzipped CSV with one object a row (keys URL-encoded). ``celebscan scan --inventory
s3://inventory-bucket/.../manifest.json`` streams those rows through the same filtering (image
names, a prefix) and the same dedupe by key and ETag as a listing would, a file at a time, so
memory stays flat in the report's size. CSV only: ORC and Parquet reports need a columnar reader
that celebscan does not install; such a manifest is refused with that reason.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import unquote

from worker.aws import AWS_ERRORS, translate
from worker.errors import ConfigurationError
from worker.listing import ListedObject
from worker.media import is_media_name
from worker.sources import Source

#: The columns celebscan reads; an inventory must be configured to include Size and ETag.
NEEDED_COLUMNS = ("Bucket", "Key", "Size", "ETag")


@dataclass(frozen=True)
class Manifest:
    source_bucket: str
    destination_bucket: str
    columns: tuple[str, ...]
    files: tuple[str, ...]  # keys of the gzipped CSV data files in the destination bucket
    #: When S3 made the report (its ``creationTimestamp``); the epoch when it says nothing.
    made_at: datetime = datetime.fromtimestamp(0, UTC)


@dataclass(frozen=True)
class InventoryListing:
    """An inventory's objects, and when the report was made: it undoes only a followed bucket's
    deletions from before then (one applied since, the report knows nothing of)."""

    objects: Iterator[ListedObject]
    made_at: datetime


def parse_s3_url(url: str) -> tuple[str, str]:
    """(bucket, key) of the manifest's ``s3://`` URL."""
    where = Source.from_url(url)
    if not where.is_s3 or not where.bucket or not where.prefix:
        raise ConfigurationError(f"{url!r} names no manifest; use s3://inventory-bucket/.../manifest.json")
    return where.bucket, where.prefix


def read_manifest(s3_client, url: str) -> Manifest:
    """The manifest at ``url``, checked: CSV, with the columns celebscan needs."""
    bucket, key = parse_s3_url(url)
    try:
        document = json.loads(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())
    except AWS_ERRORS as exc:
        raise ConfigurationError(str(translate(exc, f"reading the inventory manifest {url}"))) from exc
    except ValueError as exc:
        raise ConfigurationError(f"the inventory manifest {url} is not JSON: {exc}") from exc
    file_format = document.get("fileFormat", "")
    if file_format != "CSV":
        raise ConfigurationError(
            f"the inventory {url} is {file_format or 'of no stated format'}; celebscan reads CSV inventories "
            "(configure the inventory report with the CSV output format)"
        )
    columns = tuple(name.strip() for name in document.get("fileSchema", "").split(","))
    missing = [name for name in NEEDED_COLUMNS if name not in columns]
    if missing:
        raise ConfigurationError(
            f"the inventory {url} has no {', '.join(missing)} column: add Size and ETag to its optional fields"
        )
    destination = document.get("destinationBucket", "").rsplit(":", 1)[-1] or bucket
    return Manifest(
        source_bucket=document["sourceBucket"],
        destination_bucket=destination,
        columns=columns,
        files=tuple(item["key"] for item in document.get("files", ())),
        made_at=_made_at(document.get("creationTimestamp")),
    )


def _made_at(milliseconds) -> datetime:
    try:
        return datetime.fromtimestamp(int(milliseconds) / 1000, UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return datetime.fromtimestamp(0, UTC)


def list_inventory(s3_client, manifest: Manifest, prefix: str = "") -> Iterator[ListedObject]:
    """The image objects of the report under ``prefix``, file by file, row by row.

    Rows for delete markers and non-current versions (reports that include versions) are skipped.
    """
    column = {name: index for index, name in enumerate(manifest.columns)}
    for data_key in manifest.files:
        try:
            body = s3_client.get_object(Bucket=manifest.destination_bucket, Key=data_key)["Body"]
        except AWS_ERRORS as exc:
            where = f"s3://{manifest.destination_bucket}/{data_key}"
            raise ConfigurationError(str(translate(exc, f"reading the inventory file {where}"))) from exc
        with gzip.GzipFile(fileobj=body) as unzipped:
            for row in csv.reader(codecs.getreader("utf-8")(unzipped)):
                listed = _listed(row, column, prefix)
                if listed is not None:
                    yield listed


def _listed(row: list[str], column: dict[str, int], prefix: str) -> ListedObject | None:
    key = unquote(row[column["Key"]])
    if not key.startswith(prefix) or key.endswith("/") or not is_media_name(key):
        return None
    if "IsDeleteMarker" in column and row[column["IsDeleteMarker"]].lower() == "true":
        return None
    if "IsLatest" in column and row[column["IsLatest"]].lower() == "false":
        return None
    size = row[column["Size"]]
    return ListedObject(key=key, etag=row[column["ETag"]].strip('"'), size=int(size) if size else 0)
