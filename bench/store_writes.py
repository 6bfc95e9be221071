"""Result writes into PostgreSQL: face rows per second from ready results, idempotent.

Baseline, same run and server: ORM objects added and committed one image at a time (the common
way). celebscan: ``ResultStore.save_outcomes`` on worker batches: one message per batch (the image
updates, the face deletes and the face inserts as JSON documents that PostgreSQL expands with
``json_to_recordset``, run atomically), then one autocommit statement that finishes the scan when
nothing of it is queued.
Every image gets 5 faces in Rekognition's full shape. Target: ≥ 40× the baseline.

    python -m bench.store_writes [--images 4000] [--baseline-images 300] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import sys
import time

from sqlalchemy.orm import Session, registry

from producer.listing import ListedObject
from tests.rekognition_standin import celebrity
from tests.servers import postgres_server
from worker.results import RecognitionResult
from worker.schema import faces, images
from worker.store import ImageOutcome, ResultStore, _face_rows, utcnow

TARGET = 40.0
FACES_PER_IMAGE = 5
RESPONSE = {
    "CelebrityFaces": [celebrity(f"person {i}", left=0.15 * i) for i in range(3)],
    "UnrecognizedFaces": [{"BoundingBox": {"Width": 0.1, "Height": 0.1, "Left": 0.8, "Top": 0.1 * i},
                           "Confidence": 99.0, "Pose": {"Roll": 1, "Yaw": 2, "Pitch": 3}} for i in range(2)],
}


class ImageRow:
    pass


class FaceRow:
    pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--baseline-images", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    result = RecognitionResult.from_rekognition(RESPONSE)
    assert len(result.celebrities) + len(result.unrecognized_faces) == FACES_PER_IMAGE

    with postgres_server() as url:
        store = ResultStore.connect(url)
        scan_id = store.create_scan("s3://bench/", "rekognition")
        listed = [ListedObject(f"img/{i:06d}.jpg", f"etag{i}", 1000) for i in range(args.images + args.baseline_images)]
        ids = store.queue_images(scan_id, "bench", "rekognition", listed).image_ids
        baseline_ids, our_ids = ids[: args.baseline_images], ids[args.baseline_images :]

        baseline = _orm_one_image_at_a_time(store, baseline_ids, result)
        outcomes = [ImageOutcome.done(i, 1280, 720, result) for i in our_ids]
        started = time.perf_counter()
        for start in range(0, len(outcomes), args.batch_size):
            store.save_outcomes(outcomes[start : start + args.batch_size])
        ours = len(outcomes) * FACES_PER_IMAGE / (time.perf_counter() - started)
        store.save_outcomes(outcomes[: args.batch_size])  # idempotent: writing a batch again adds nothing
        assert store.scan_summary(scan_id).faces == len(ids) * FACES_PER_IMAGE

    ratio = ours / baseline
    print(f"baseline (ORM, commit per image): {baseline:,.0f} face rows/s")
    print(f"celebscan (save_outcomes, batches of {args.batch_size}): {ours:,.0f} face rows/s")
    print(f"ratio: {ratio:.1f}x (target >= {TARGET:.0f}x) {'OK' if ratio >= TARGET else 'MISSED'}")
    return 0 if ratio >= TARGET else 1


def _orm_one_image_at_a_time(store: ResultStore, image_ids: list[int], result: RecognitionResult) -> float:
    mapper = registry()
    mapper.map_imperatively(ImageRow, images)
    mapper.map_imperatively(FaceRow, faces)
    started = time.perf_counter()
    with Session(store.engine) as session:
        for image_id in image_ids:
            image = session.get(ImageRow, image_id)
            image.status, image.width, image.height, image.processed_at = "done", 1280, 720, utcnow()
            for row in _face_rows(image_id, result):
                face = FaceRow()
                for column, value in row.items():
                    setattr(face, column, value)
                session.add(face)
            session.commit()
    elapsed = time.perf_counter() - started
    mapper.dispose()
    return len(image_ids) * FACES_PER_IMAGE / elapsed


if __name__ == "__main__":
    sys.exit(main())
