"""Who is where: `celebscan people`, `results --person` and `report --person`, on both databases,
and the query plans that keep them fast at millions of faces (PostgreSQL)."""

from __future__ import annotations

import csv
import io
import json

import pytest
from sqlalchemy import text

from tests.clirun import celebscan
from tests.conftest import write_outcomes
from worker.listing import ListedObject
from worker.outcomes import ImageOutcome
from worker.recognition import BoundingBox, Celebrity, RecognitionResult

BUCKET = "photos"
BOX = BoundingBox(0.1, 0.2, 0.3, 0.4)


def found(*people: tuple[str, str]) -> RecognitionResult:
    """Faces of (name, Rekognition id), side by side."""
    return RecognitionResult(
        celebrities=tuple(
            Celebrity(name=name, id=person_id, match_confidence=90.0, bounding_box=BOX) for name, person_id in people
        )
    )


OBAMA, BIDEN = ("Barack Obama", "3R3sg9u"), ("Joe Biden", "1Ac5Xj")
#: Two people who share a name, told apart by their Rekognition ids.
SMITH_A, SMITH_B = ("John Smith", "smith-actor"), ("John Smith", "smith-athlete")


def scan_of(store, answers: dict[str, RecognitionResult]) -> int:
    scan_id = store.create_scan(f"s3://{BUCKET}/", "rekognition")
    listed = [ListedObject(key=key, etag="e", size=100) for key in answers]
    report = store.queue_images(scan_id, BUCKET, "rekognition", listed)
    by_key = {image.key: image.id for image in store.images.queued(report.image_ids)}
    write_outcomes(store, [ImageOutcome.done(by_key[key], 640, 480, answer) for key, answer in answers.items()])
    return scan_id


@pytest.fixture
def people_scan(store):
    """2,500 images of Obama (more than two chunks of ids), 7 of them with Biden too, 3 of Biden
    alone, Obama twice in one image, the two John Smiths, and 20 with nobody."""
    answers = {f"obama/{i:04d}.jpg": found(OBAMA) for i in range(2_500)}
    answers.update({f"obama/{i:04d}.jpg": found(OBAMA, BIDEN) for i in range(0, 700, 100)})
    answers.update({f"biden/{i}.jpg": found(BIDEN) for i in range(3)})
    answers["mirror.jpg"] = found(OBAMA, OBAMA)
    answers.update({"smith/actor.jpg": found(SMITH_A), "smith/athlete-1.jpg": found(SMITH_B)})
    answers["smith/athlete-2.jpg"] = found(SMITH_B)
    answers.update({f"nobody/{i}.jpg": RecognitionResult() for i in range(20)})
    return scan_of(store, answers)


def cli(store, *args: str, ok: bool = True):
    return celebscan("--database-url", str(store.engine.url.render_as_string(hide_password=False)), *args, ok=ok)


def test_people_lists_everyone_most_images_first_apart_by_id(store, people_scan):
    assert [(p.name, p.person_id, p.images) for p in store.people(people_scan)] == [
        ("Barack Obama", "3R3sg9u", 2_501),  # the mirror image counts once
        ("Joe Biden", "1Ac5Xj", 10),
        ("John Smith", "smith-athlete", 2),
        ("John Smith", "smith-actor", 1),
    ]
    lines = cli(store, "people").output.splitlines()
    assert lines == [
        "2,501  Barack Obama",
        "   10  Joe Biden",
        "    2  John Smith  (id smith-athlete)",
        "    1  John Smith  (id smith-actor)",
    ]
    as_json = [
        json.loads(line)
        for line in cli(store, "people", "--scan", str(people_scan), "--format", "jsonl").output.splitlines()
    ]
    assert as_json[1] == {"name": "Joe Biden", "id": "1Ac5Xj", "images": 10, "videos": 0}
    assert cli(store, "people", "--limit", "1").output.splitlines() == ["2,501  Barack Obama"]


def test_results_for_a_person_by_name_or_id_in_every_format(store, people_scan):
    records = [json.loads(line) for line in cli(store, "results", "--person", "Joe Biden").output.splitlines()]
    keys = [record["key"] for record in records]
    assert sorted(keys) == sorted(
        [f"obama/{i:04d}.jpg" for i in range(0, 700, 100)] + [f"biden/{i}.jpg" for i in range(3)]
    )
    assert all("Joe Biden" in [c["name"] for c in record["celebrities"]] for record in records)

    by_id = cli(store, "results", "--person", "1Ac5Xj", "--format", "csv", "--scan", str(people_scan)).output
    rows = list(csv.DictReader(io.StringIO(by_id)))
    assert sorted(row["key"] for row in rows) == sorted(keys)

    obama = [json.loads(line)["key"] for line in cli(store, "results", "--person", "Barack Obama").output.splitlines()]
    assert len(obama) == len(set(obama)) == 2_501, "every image once, across chunks of ids, the mirror once"

    smiths = [json.loads(line)["key"] for line in cli(store, "results", "--person", "John Smith").output.splitlines()]
    assert sorted(smiths) == ["smith/actor.jpg", "smith/athlete-1.jpg", "smith/athlete-2.jpg"]
    athlete = cli(store, "results", "--person", "smith-athlete").output.splitlines()
    assert sorted(json.loads(line)["key"] for line in athlete) == ["smith/athlete-1.jpg", "smith/athlete-2.jpg"]

    both = [
        json.loads(line)["key"]
        for line in cli(store, "results", "--person", "Joe Biden", "--person", "smith-actor").output.splitlines()
    ]
    assert len(both) == len(set(both)) == 11
    assert cli(store, "results", "--person", "Nobody Known").output == ""


def test_the_report_shows_counts_and_a_bounded_number_of_pictures(store, people_scan, tmp_path, monkeypatch):
    import producer.html_report

    monkeypatch.setattr(producer.html_report, "thumbnail", lambda record, readers: (None, "not read in this test"))
    page = tmp_path / "report.html"
    output = cli(store, "report", "--output", str(page), "--per-person", "5").output
    html = page.read_text()
    figures = html.count("<figure ")
    assert "4 people" in output
    assert figures <= 5 * 4 + 5 and figures >= 5 + 5, "5 of Obama's 2,501, a few of each other, 5 with nobody"
    assert 'data-images="2501">Barack Obama (2501)' in html and 'data-images="3">John Smith (3)' in html

    only = tmp_path / "biden.html"
    cli(store, "report", "--person", "Joe Biden", "--output", str(only))
    biden = only.read_text()
    assert biden.count("<figure ") == 10 and "Barack Obama (" not in biden.split("<main")[0]
    refused = cli(store, "report", "--person", "Nobody Known", "--output", str(only), ok=False)
    assert refused.exit_code == 1 and "nobody called Nobody Known" in refused.output


def test_a_persons_images_are_read_by_index_at_scale(pg_store):
    """200,000 face rows of 2,000 people: finding one person's images reads the faces' indexes, and
    listing everyone reads the kept counts, never the faces (the plans are printed)."""
    with pg_store.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO scans (source, backend, created_at, listed, skipped) "
                "VALUES ('s3://b/', 'rekognition', now(), 0, 0)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO images (scan_id, bucket, key, etag, size, backend, status, attempts) "
                "SELECT 1, 'b', 'k' || i, 'e', 1, 'rekognition', 'done', 0 FROM generate_series(1, 200000) AS i"
            )
        )
        conn.execute(
            text(
                "INSERT INTO faces (image_id, face_index, name, person_id, match_confidence, box_left, box_top, "
                "box_width, box_height) SELECT i, 0, 'person ' || (i % 2000), 'id-' || (i % 2000), 99, 0, 0, 0.1, 0.1 "
                "FROM generate_series(1, 200000) AS i"
            )
        )
        conn.execute(text("ANALYZE"))
    from worker.findings import next_ids_query, people_query, person_ranges

    plans = {}
    with pg_store.engine.connect() as conn:
        ranges = person_ranges(conn, ["person 7", "id-8"])
        for name, query in {
            "one person's next images (by name, by id)": next_ids_query(ranges, 0),
            "everyone found": people_query(),
        }.items():
            sql = query.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True})
            plans[name] = "\n".join(conn.execute(text(f"EXPLAIN {sql}")).scalars())
    print("\n" + "\n\n".join(f"{name}:\n{plan}" for name, plan in plans.items()))
    one = plans["one person's next images (by name, by id)"]
    assert "Seq Scan on faces" not in one and "ix_faces_person_id" in one and "ix_faces_name" in one, one
    assert "faces" not in plans["everyone found"], "everyone's counts are kept, not counted from the faces"
    records = list(pg_store.result_records(1, persons=["person 7", "id-8"]))
    assert len(records) == 200 and len({r.key for r in records}) == 200
    assert {c.name for r in records for c in r.celebrities} == {"person 7", "person 8"}


def test_the_counts_stay_exact_through_rewrites_forced_rescans_and_an_upgrade(store, people_scan):
    from sqlalchemy import delete

    from worker.database import create_or_upgrade_schema
    from worker.schema import person_images

    def counts(scan_id=None):
        return [(p.name, p.person_id, p.images) for p in store.people(scan_id)]

    def biden_in(*scan_ids):
        return sum(
            dict(((n, i), c) for n, i, c in counts(scan_id)).get(("Joe Biden", "1Ac5Xj"), 0) for scan_id in scan_ids
        )

    before = counts()
    with store.engine.connect() as conn:
        first_50 = conn.execute(text("SELECT id, key FROM images ORDER BY id LIMIT 50")).all()
    rewrite = store.create_scan(f"s3://{BUCKET}/", "rekognition")  # --force: queued again, faces kept till done
    listed = [ListedObject(key=key, etag="e", size=100) for _, key in first_50]
    store.queue_images(rewrite, BUCKET, "rekognition", listed, force=True)
    assert counts() == before, "the counts moved along with the images"
    outcomes = [ImageOutcome.done(image_id, 640, 480, found(OBAMA, BIDEN)) for image_id, _ in first_50]
    write_outcomes(store, outcomes, "rewrite-run")
    store.images.write("rewrite-run", outcomes)  # the same write again: nothing counted twice
    obama = before[0][2]
    rewritten_biden = sum(1 for i in range(0, 700, 100) if i >= 50) + 3 + 50  # the 50 now all show Biden
    assert counts()[:2] == [("Barack Obama", "3R3sg9u", obama), ("Joe Biden", "1Ac5Xj", rewritten_biden)]
    assert biden_in(rewrite) == 50

    rescan = store.create_scan(f"s3://{BUCKET}/", "rekognition")  # --force: done images move to the new scan
    listed = [ListedObject(key=f"biden/{i}.jpg", etag="e", size=100) for i in range(3)]
    store.queue_images(rescan, BUCKET, "rekognition", listed, force=True)
    assert counts(rescan) == [("Joe Biden", "1Ac5Xj", 3)]
    assert biden_in(people_scan, rewrite) == rewritten_biden - 3
    assert counts()[:2] == [("Barack Obama", "3R3sg9u", obama), ("Joe Biden", "1Ac5Xj", rewritten_biden)]

    with store.engine.begin() as conn:  # a database from before the counts: the table appears, filled
        conn.execute(delete(person_images))
        person_images.drop(conn)
    create_or_upgrade_schema(store.engine)
    assert counts()[:2] == [("Barack Obama", "3R3sg9u", obama), ("Joe Biden", "1Ac5Xj", rewritten_biden)]
