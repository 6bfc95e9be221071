"""Who is where at scale: `people` and `results --person` over millions of face rows in PostgreSQL.

A fresh PostgreSQL gets ``--faces`` face rows (default 10 million: 5 million images of one scan,
two faces each, 20,000 people whose image counts follow Zipf's law, as in a real photo bucket),
written with ``generate_series`` and analyzed. Then, through celebscan's own functions:
- ``people``: everyone found with their image counts, most first;
- ``results --person``: the first record of a person, and all records of a person in ~1,000
  images, streamed (``results`` keeps a chunk of 1,000 in memory, never the whole list).
Baseline, same server and data: as before this change, `people` grouping every face, and the
same record calls with the two indexes it added (``ix_faces_name``, ``ix_faces_person_id``)
dropped. celebscan: `people` reads the counts kept per scan and person (``person_images``, filled
here as the write path keeps it). Each figure is the best of 3.
Target: under a second for one person's records and for ``people``'s list.

    python -m bench.people_scale [--faces 10000000]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from sqlalchemy import text

from tests.servers import postgres_server
from worker import person_counts
from worker.store import ResultStore

PEOPLE = 20_000
FACES_PER_IMAGE = 2


def fill(store: ResultStore, face_rows: int) -> None:
    images = face_rows // FACES_PER_IMAGE
    with store.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO scans (source, backend, created_at, listed, skipped) "
                "VALUES ('s3://big/', 'rekognition', now(), :n, 0)"
            ),
            {"n": images},
        )
        conn.execute(
            text(
                "INSERT INTO images (scan_id, bucket, key, etag, size, backend, status, attempts) "
                "SELECT 1, 'big', 'img' || i || '.jpg', md5(i::text), 100000, 'rekognition', 'done', 0 "
                "FROM generate_series(1, :n) AS i"
            ),
            {"n": images},
        )
        # Person k (1-based) appears with probability ~ 1/k (Zipf): a few people in many images.
        conn.execute(
            text(
                "INSERT INTO faces (image_id, face_index, name, person_id, match_confidence, face_confidence, "
                "box_left, box_top, box_width, box_height) "
                "SELECT i, f, 'person ' || p, 'id' || p, 99, 99, 0.1 * f, 0.1, 0.1, 0.1 "
                "FROM generate_series(1, :n) AS i, generate_series(0, :faces - 1) AS f, "
                "LATERAL (SELECT least(:people, floor(exp(random() * ln(:people + 1)))::int + (i + f) * 0) AS p) AS z"
            ),
            {"n": images, "faces": FACES_PER_IMAGE, "people": PEOPLE},
        )
        person_counts.backfill(conn)  # what the write path keeps as faces are written
    with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))


def best_of(call: Callable[[], object], rounds: int = 3) -> tuple[float, object]:
    timings, result = [], None
    for _ in range(rounds):
        started = time.perf_counter()
        result = call()
        timings.append(time.perf_counter() - started)
    return min(timings), result


#: How `people` counted before the counts were kept: every face, grouped.
PEOPLE_FROM_FACES = text(
    "SELECT name, person_id, count(DISTINCT image_id) AS images FROM faces WHERE name IS NOT NULL "
    "GROUP BY name, person_id ORDER BY images DESC, name, person_id"
)


def measure(store: ResultStore, person: str, kept_counts: bool) -> dict[str, float]:
    def people() -> list:
        if kept_counts:
            return store.people()
        with store.engine.connect() as conn:
            return conn.execute(PEOPLE_FROM_FACES).all()

    people_s, everyone = best_of(people)
    first_s, _ = best_of(lambda: next(iter(store.result_records(1, persons=[person]))))
    all_s, records = best_of(lambda: sum(1 for _ in store.result_records(1, persons=[person])))
    assert isinstance(everyone, list) and everyone and isinstance(records, int) and records > 0
    return {"people_s": people_s, "people": len(everyone), "first_s": first_s, "all_s": all_s, "records": records}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=int, default=10_000_000)
    args = parser.parse_args()
    with postgres_server() as url:
        store = ResultStore.connect(url)
        started = time.perf_counter()
        fill(store, args.faces)
        print(f"{args.faces:,} face rows written and analyzed in {time.perf_counter() - started:.0f} s")
        with store.engine.connect() as conn:
            person = conn.execute(
                text(
                    "SELECT name FROM faces WHERE name IS NOT NULL GROUP BY name ORDER BY abs(count(*) - 1000) LIMIT 1"
                )
            ).scalar_one()
        indexed = measure(store, person, kept_counts=True)
        with store.engine.begin() as conn:
            conn.execute(text("DROP INDEX ix_faces_name; DROP INDEX ix_faces_person_id"))
        baseline = measure(store, person, kept_counts=False)
        store.engine.dispose()
    print(f"\n{'figure':<44}{'baseline (no index)':>22}{'celebscan':>14}{'ratio':>9}")
    rows = [
        (f"people: {indexed['people']:,.0f} people listed (s)", "people_s"),
        (f"results --person '{person}': first record (s)", "first_s"),
        (f"results --person: all {indexed['records']:,.0f} records (s)", "all_s"),
    ]
    for label, name in rows:
        print(f"{label:<44}{baseline[name]:>22.3f}{indexed[name]:>14.3f}{baseline[name] / indexed[name]:>8.1f}x")
    met = indexed["all_s"] < 1.0 and indexed["people_s"] < 1.0
    print(f"target: one person's records and the people list each under 1 s: {'OK' if met else 'MISSED'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
