"""Result writes into PostgreSQL: face rows per second from ready results, idempotent.

Baseline, same run and server: ORM objects added and committed one image at a time (the common
way). celebscan: ``ImageQueue.write`` on batches of ready results, each claimed by a run of its own
beforehand (as a worker's batch is): the image rows the run holds updated from one JSON document
(the claim is the fence), the faces replaced with ``COPY`` (streamed while the server inserts),
the scan finished when nothing of it is queued; one transaction per batch, so writing a batch
again (a replay) changes nothing. Every image gets 5 faces in Rekognition's full shape. The server is a fresh
PostgreSQL with its default durability settings (fsync on). Each figure is the median of
``--rounds`` rounds, the baseline and every batch size measured in turn within a round.
Target: ≥ 40× the baseline at ``--batch-size`` (bulk writes of ready results); the smaller
batches a worker writes (16 images: a batch's worth of recognition) are printed beside it.

    python -m bench.store_writes [--images 3000] [--baseline-images 300] [--batch-size 500] [--rounds 3]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time

from sqlalchemy.orm import Session, registry

from tests.rekognition_standin import celebrity
from tests.servers import postgres_server
from worker.database import utcnow
from worker.listing import ListedObject
from worker.outcomes import ImageOutcome, face_row_dicts
from worker.recognition import RecognitionResult
from worker.schema import faces, images
from worker.store import ResultStore

TARGET = 40.0
FACES_PER_IMAGE = 5
RESPONSE = {
    "CelebrityFaces": [celebrity(f"person {i}", left=0.15 * i) for i in range(3)],
    "UnrecognizedFaces": [
        {
            "BoundingBox": {"Width": 0.1, "Height": 0.1, "Left": 0.8, "Top": 0.1 * i},
            "Confidence": 99.0,
            "Pose": {"Roll": 1, "Yaw": 2, "Pitch": 3},
        }
        for i in range(2)
    ],
}


class ImageRow:
    pass


class FaceRow:
    pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--baseline-images", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--no-embeddings", action="store_true", help="Faces without their 256-byte embeddings (as before issue 28)."
    )
    args = parser.parse_args()
    result = RecognitionResult.from_rekognition(RESPONSE)
    if not args.no_embeddings:
        result = _remembered(result)
    assert len(result.celebrities) + len(result.unrecognized_faces) == FACES_PER_IMAGE
    batch_sizes = sorted({16, 100, args.batch_size})

    with postgres_server(durable=True) as url:
        store = ResultStore.connect(url)
        scan_id = store.create_scan("s3://bench/", "rekognition")
        per_round = args.baseline_images + args.images * len(batch_sizes)
        listed = [ListedObject(f"img/{i:07d}.jpg", f"etag{i}", 1000) for i in range(per_round * args.rounds)]
        ids = iter(store.queue_images(scan_id, "bench", "rekognition", listed).image_ids)
        baseline, ours = [], {size: [] for size in batch_sizes}
        for _ in range(args.rounds):
            baseline.append(_orm_one_image_at_a_time(store, list(itertools.islice(ids, args.baseline_images)), result))
            for size in batch_sizes:
                outcomes = [ImageOutcome.done(i, 1280, 720, result) for i in itertools.islice(ids, args.images)]
                ours[size].append(_save_in_batches(store, outcomes, size))
                replay = store.images.write(f"bench-{outcomes[0].image_id}", outcomes[:size])
                assert not replay.written, "writing a batch again adds nothing"
        assert store.scan_summary(scan_id).faces == len(listed) * FACES_PER_IMAGE

    baseline_rate = statistics.median(baseline)
    print(f"baseline (ORM, commit per image): {baseline_rate:,.0f} face rows/s")
    for size in batch_sizes:
        rate = statistics.median(ours[size])
        print(
            f"celebscan ImageQueue.write, batches of {size:>4} images: {rate:>7,.0f} face rows/s "
            f"= {rate / baseline_rate:5.1f}x"
        )
    ratio = statistics.median(ours[args.batch_size]) / baseline_rate
    print(
        f"ratio at batches of {args.batch_size}: {ratio:.1f}x (target >= {TARGET:.0f}x) "
        f"{'OK' if ratio >= TARGET else 'MISSED'}"
    )
    return 0 if ratio >= TARGET else 1


def _remembered(result: RecognitionResult) -> RecognitionResult:
    """Every face with a float16 embedding, as the workers write them."""
    import dataclasses

    import numpy as np

    from worker.faces.models import CURRENT

    vectors = CURRENT.normalized(np.random.default_rng(0).normal(size=(FACES_PER_IMAGE, CURRENT.dimension)))
    faces = [
        dataclasses.replace(face, embedding=CURRENT.pack(v)) for face, v in zip(result.faces, vectors, strict=True)
    ]
    named = len(result.celebrities)
    return dataclasses.replace(
        result,
        celebrities=tuple(faces[:named]),
        unrecognized_faces=tuple(faces[named:]),
        embedding_model=CURRENT.id,
    )


def _save_in_batches(store: ResultStore, outcomes: list[ImageOutcome], batch_size: int) -> float:
    batches = [outcomes[start : start + batch_size] for start in range(0, len(outcomes), batch_size)]
    for batch in batches:  # claimed before the clock starts: a worker's batch is claimed before it is recognized
        store.images.claim_ids([o.image_id for o in batch], f"bench-{batch[0].image_id}")
    started = time.perf_counter()
    for batch in batches:
        written = store.images.write(f"bench-{batch[0].image_id}", batch)
        store.finish_scans(written.scan_ids)
    return len(outcomes) * FACES_PER_IMAGE / (time.perf_counter() - started)


def _orm_one_image_at_a_time(store: ResultStore, image_ids: list[int], result: RecognitionResult) -> float:
    mapper = registry()
    mapper.map_imperatively(ImageRow, images)
    mapper.map_imperatively(FaceRow, faces)
    started = time.perf_counter()
    with Session(store.engine) as session:
        for image_id in image_ids:
            image = session.get(ImageRow, image_id)
            image.status, image.width, image.height, image.processed_at = "done", 1280, 720, utcnow()
            for row in face_row_dicts(image_id, result):
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
