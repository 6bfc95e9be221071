"""Pay once per picture: copies of a picture under other keys reuse its result instead of a call.

A bucket where each of 6 pictures is stored under 4 keys (moto's S3 server, the Rekognition
stand-in, a real embedded scan); a folder of copies with the local recognizer on faces-dev; and
copies within one batch, on both databases.
"""

from __future__ import annotations

import hashlib
import shutil

import pytest
from sqlalchemy import func, select

from tests.clirun import celebscan
from tests.conftest import folder_worker_context
from tests.imagemaker import jpeg
from tests.rekognition_standin import celebrity
from worker.batch import process_batch
from worker.listing import list_folder
from worker.recognition import BoundingBox, Celebrity, RecognitionResult
from worker.recognizers.stub import StubRecognizer
from worker.schema import faces, images
from worker.store import ResultStore

PICTURES = {f"person {number}": jpeg(200 + 10 * number, 150) for number in range(6)}
COPIES = ("2024/", "backup/2024/", "shared/alice/", "shared/bob/")


@pytest.fixture
def copied_bucket(s3, bucket, rekognition, aws_env, tmp_path):
    """Every picture under 4 keys; the stand-in names the person each picture shows."""
    by_digest = {hashlib.md5(data).hexdigest(): name for name, data in PICTURES.items()}
    for folder in COPIES:
        for name, data in PICTURES.items():
            s3.put_object(Bucket=bucket, Key=f"{folder}{name.replace(' ', '-')}.jpg", Body=data)
    rekognition.answer = lambda key, data: {"CelebrityFaces": [celebrity(by_digest[hashlib.md5(data).hexdigest()])]}
    env = {**aws_env, "AWS_ENDPOINT_URL_REKOGNITION": rekognition.url}
    return bucket, env


def scan(env, database: str, *args: str) -> str:
    return celebscan(
        "--database-url", database, "scan", *args, "--backend", "rekognition", "--workers", "1", env=env
    ).output


def expected_name(key: str) -> str:
    return key.rsplit("/", 1)[1].removesuffix(".jpg").replace("-", " ")


def test_every_copy_gets_its_record_and_only_distinct_pictures_are_paid(copied_bucket, rekognition, s3, tmp_path):
    bucket, env = copied_bucket
    database = f"sqlite:///{tmp_path / 'dedupe.db'}"
    output = scan(env, database, f"s3://{bucket}/")
    assert len(rekognition.calls) == len(PICTURES), "one call per distinct picture"
    assert "paid calls: 6" in output and "18 duplicates reused (saved $0.0180)" in output, output

    store = ResultStore.connect(database)
    records = list(store.result_records())
    assert len(records) == 24 and {r.status for r in records} == {"done"}
    assert all([c.name for c in r.celebrities] == [expected_name(r.key)] for r in records)
    with store.engine.connect() as conn:
        rows = conn.execute(select(images.c.key, images.c.paid_calls, images.c.copied_from, images.c.id)).all()
        face_rows = conn.execute(select(func.count()).select_from(faces)).scalar_one()
    originals = {row.id: row.key for row in rows if row.copied_from is None}
    assert len(originals) == 6 and sum(row.paid_calls for row in rows) == 6
    for row in rows:
        if row.copied_from is not None:
            assert row.paid_calls == 0 and expected_name(originals[row.copied_from]) == expected_name(row.key)
    assert face_rows == 24, "each copy has its own face rows"

    for folder in COPIES[:2]:  # a new copy of known pictures, in a later scan: no call
        for name, data in PICTURES.items():
            s3.put_object(Bucket=bucket, Key=f"later/{folder}{name.replace(' ', '-')}.jpg", Body=data)
    later = scan(env, database, f"s3://{bucket}/later/")
    assert len(rekognition.calls) == 6 and "12 duplicates reused" in later

    forced = scan(env, database, f"s3://{bucket}/2024/", "--force")
    assert len(rekognition.calls) == 12 and "duplicates reused" not in forced, "--force recognizes again"
    store.engine.dispose()


def test_max_cost_budgets_distinct_pictures(copied_bucket, rekognition, tmp_path):
    bucket, env = copied_bucket
    database = f"sqlite:///{tmp_path / 'budget.db'}"
    output = scan(env, database, f"s3://{bucket}/", "--max-cost", "0.006")
    assert "pays for 6 images" in output
    store = ResultStore.connect(database)
    summary = store.summary(store.latest_scan_id())
    assert len(rekognition.calls) == 6 and summary.counts == {"queued": 0, "done": 24, "failed": 0}, output
    store.engine.dispose()


def test_copies_in_one_batch_and_in_the_next(store, tmp_path):
    """Two copies of a picture in one batch: one call, the second copies the first's result before
    either is written; a copy in the next batch copies the stored faces. Never a doubled row."""
    folder = tmp_path / "photos"
    folder.mkdir()
    one, other = jpeg(240, 160), jpeg(260, 160)
    for name, data in {"a.jpg": one, "b.jpg": other, "c.jpg": one, "d.jpg": one}.items():
        (folder / name).write_bytes(data)
    scan_id = store.create_scan(str(folder), "stub")
    ids = store.queue_images(scan_id, str(folder), "stub", list_folder(folder)).image_ids
    box = BoundingBox(0.1, 0.1, 0.3, 0.3)
    stub = StubRecognizer(lambda image: RecognitionResult(celebrities=(Celebrity("obama", "1", 97.0, box),)))

    first = process_batch(ids[:3], folder_worker_context(store, stub))  # a, b, c: c copies a
    assert stub.calls == 2 and first.done == 3
    second = process_batch(ids[3:], folder_worker_context(store, stub))  # d copies a, from the database
    assert stub.calls == 2 and second.done == 1
    process_batch(ids, folder_worker_context(store, stub))  # delivered again: nothing to do, nothing doubled
    with store.engine.connect() as conn:
        copied = dict(conn.execute(select(images.c.key, images.c.copied_from)).all())
        per_image = dict(conn.execute(select(faces.c.image_id, func.count()).group_by(faces.c.image_id)).all())
    assert copied == {"a.jpg": None, "b.jpg": None, "c.jpg": ids[0], "d.jpg": ids[0]}
    assert per_image == dict.fromkeys(ids, 1)
    assert {r.key: r.names for r in store.result_records()} == dict.fromkeys(
        ["a.jpg", "b.jpg", "c.jpg", "d.jpg"], ["obama"]
    )


@pytest.mark.slow
def test_the_local_recognizer_recognizes_each_picture_once(faces_dev, expected_people, tmp_path):
    folder = tmp_path / "photos"
    originals = sorted((faces_dev / "test").iterdir())[:3]
    for copy in ("a", "b", "c"):
        (folder / copy).mkdir(parents=True)
        for photo in originals:
            shutil.copyfile(photo, folder / copy / photo.name)
    database = f"sqlite:///{tmp_path / 'local.db'}"
    celebscan("--database-url", database, "gallery", "import", faces_dev / "train")
    output = celebscan("--database-url", database, "scan", folder, "--workers", "1").output
    assert "6 duplicates reused" in output, output
    store = ResultStore.connect(database)
    names = {r.key: sorted(r.names) for r in store.result_records()}
    for photo in originals:
        expected = sorted(expected_people[f"test/{photo.name}"])
        assert [names[f"{copy}/{photo.name}"] for copy in "abc"] == [expected] * 3, photo.name
    store.engine.dispose()


def test_estimate_counts_distinct_pictures(copied_bucket, rekognition, tmp_path):
    bucket, env = copied_bucket
    database = f"sqlite:///{tmp_path / 'estimate.db'}"
    before = celebscan("--database-url", database, "estimate", f"s3://{bucket}/", env=env).output
    assert "24 images" in before and "distinct pictures: 6 (18 copies" in before, before
    assert "estimated Rekognition cost: $0.0060 for 6 calls" in before
    scan(env, database, f"s3://{bucket}/2024/")
    after = celebscan("--database-url", database, "estimate", f"s3://{bucket}/", env=env).output
    assert "already done with rekognition (skipped): 6" in after
    assert "distinct pictures: 0 (18 copies" in after and "for 0 calls" in after, after
    assert len(rekognition.calls) == 6, "estimate never calls"
