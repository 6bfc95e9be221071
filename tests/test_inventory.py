"""Scanning from an S3 Inventory report instead of a listing: a manifest and gzipped CSV files
written into moto's S3 the way S3 Inventory writes them."""

import csv
import gzip
import io
import json
from urllib.parse import quote

import pytest

from tests.clirun import celebscan
from tests.imagemaker import jpeg
from worker.store import ResultStore

SCHEMA = "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag, StorageClass"


def write_inventory(s3, source_bucket: str, rows_per_file: list[list[list[str]]], *, file_format="CSV") -> str:
    """A report under ``inventory/`` in its own bucket; returns the manifest's s3:// URL."""
    destination = f"{source_bucket}-inventory"
    s3.create_bucket(Bucket=destination)
    files = []
    for number, rows in enumerate(rows_per_file):
        text = io.StringIO()
        csv.writer(text, quoting=csv.QUOTE_ALL).writerows(rows)
        data = gzip.compress(text.getvalue().encode())
        key = f"inventory/{source_bucket}/daily/data/part-{number}.csv.gz"
        s3.put_object(Bucket=destination, Key=key, Body=data)
        files.append({"key": key, "size": len(data), "MD5checksum": "0" * 32})
    manifest = {
        "sourceBucket": source_bucket,
        "destinationBucket": f"arn:aws:s3:::{destination}",
        "version": "2016-11-30",
        "creationTimestamp": "1735689600000",
        "fileFormat": file_format,
        "fileSchema": SCHEMA,
        "files": files,
    }
    key = f"inventory/{source_bucket}/daily/2025-01-01T00-00Z/manifest.json"
    s3.put_object(Bucket=destination, Key=key, Body=json.dumps(manifest).encode())
    return f"s3://{destination}/{key}"


def row(s3, bucket: str, key: str, *, latest="true", delete_marker="false") -> list[str]:
    head = s3.head_object(Bucket=bucket, Key=key) if delete_marker == "false" else {"ContentLength": 0, "ETag": ""}
    return [
        bucket,
        quote(key),
        "v1",
        latest,
        delete_marker,
        str(head["ContentLength"]),
        "2025-01-01T00:00:00.000Z",
        head["ETag"].strip('"'),
        "STANDARD",
    ]


def scan_inventory(database_url: str, source: str, manifest: str):
    """``celebscan scan SOURCE --inventory MANIFEST`` with Rekognition, one worker process."""
    args = ["--database-url", database_url, "scan", source, "--inventory", manifest]
    return celebscan(*args, "--backend", "rekognition", "--workers", "1")


@pytest.fixture
def inventoried(s3, bucket):
    keys = [f"photos/{n:02d}.jpg" for n in range(12)] + ["photos/ünïcode name + 100%.jpg", "other/x.jpg"]
    for n, key in enumerate(keys):
        s3.put_object(Bucket=bucket, Key=key, Body=jpeg(200 + n, 150))
    s3.put_object(Bucket=bucket, Key="photos/notes.txt", Body=b"not an image")
    rows = [row(s3, bucket, key) for key in keys] + [row(s3, bucket, "photos/notes.txt")]
    rows.append(row(s3, bucket, "photos/gone.jpg", delete_marker="true"))
    return keys, write_inventory(s3, bucket, [rows[:7], rows[7:]])


def test_a_scan_from_an_inventory_queues_what_a_listing_would(inventoried, bucket, aws_env, rekognition, sqlite_url):
    keys, manifest = inventoried
    rekognition.answer = lambda key, data: {"CelebrityFaces": []}
    run = scan_inventory(sqlite_url, f"s3://{bucket}/photos/", manifest)
    photos = [key for key in keys if key.startswith("photos/")]
    assert f"listed {len(photos)} images; 0 already done" in run.output
    store = ResultStore.connect(sqlite_url)
    records = {r.key: r for r in store.result_records()}
    assert set(records) == set(photos), "prefix, image names, delete markers and URL-encoded keys as a listing"
    assert {r.status for r in records.values()} == {"done"}
    assert {c.key for c in rekognition.calls} == set(photos), "the workers read the inventoried bucket"

    again = celebscan("--database-url", sqlite_url, "scan", "--inventory", manifest, "--backend", "rekognition")
    assert f"{len(photos)} already done" in again.output and "listed 14 images" in again.output
    store.engine.dispose()


def test_an_inventory_in_another_format_or_of_another_bucket_is_refused(s3, bucket, aws_env, sqlite_url):
    parquet = write_inventory(s3, bucket, [], file_format="Parquet")
    refused = celebscan("--database-url", sqlite_url, "scan", "--inventory", parquet, ok=False)
    assert refused.exit_code == 1 and "celebscan reads CSV inventories" in refused.output
    csv_manifest = write_inventory(s3, bucket, [])
    elsewhere = celebscan(
        "--database-url", sqlite_url, "scan", "s3://another-bucket/", "--inventory", csv_manifest, ok=False
    )
    assert elsewhere.exit_code == 1 and f"lists s3://{bucket}/, not s3://another-bucket/" in elsewhere.output
