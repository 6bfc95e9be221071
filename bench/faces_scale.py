"""Faces remembered at scale: find, enrolling later and grouping the unknown over millions of
stored faces in PostgreSQL, against the rescan they replace.

For each size (``--sizes``, default 1M and 10M faces), a fresh database gets that many face rows
with float16 embeddings, as a local scan with an empty gallery leaves them: two faces a picture,
people seen with Zipf-distributed frequency (N/50 people), each face its person's centre plus
noise, made unit-length as SFace's (same-person distances ~0.7, other people ~1.4; on faces-dev
SFace's medians are 0.70 and 1.33), all unnamed. Through celebscan's own code, in this process:
- the face index's first build, and an incremental refresh after 10,000 new faces and 1,000 erased;
- ``find``: every picture with a face of one person (median of 5);
- enrolling one person (5 photos) and labelling every stored face they now match;
- grouping the unknown (at 1M: every face is unknown, the issue's 1M target);
- the process's peak RSS.
Baseline, same process: ``scan --force`` of the faces-dev pictures (embedded, local recognizer, 2
processes), timed per picture and scaled to the same pictures' count, with its recognizer calls and
reads (one each per picture; a Rekognition scan pays each call). celebscan's path is counted: 0
recognizer calls, 0 pictures read.

Targets (issue 28, 2 cores, 10M faces): find < 1 s, labelling after enrolling one person < 60 s,
grouping 1M unknown faces < 10 min, memory bounded (no Python object per face).

    python -m bench.faces_scale [--sizes 1000000,10000000]
"""

from __future__ import annotations

import argparse
import io
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sqlalchemy import text

from tests.servers import postgres_server
from worker.faces.gallery import Gallery
from worker.faces.grouping import Grouping
from worker.faces.index import FaceIndex
from worker.faces.labelling import Labeller
from worker.faces.models import CURRENT
from worker.faces.search import find
from worker.settings import Settings
from worker.store import ResultStore

FACES_DEV = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "faces-dev"
MODEL = CURRENT
DIMENSION = MODEL.dimension
#: Noise around a unit-length centre, before the face is made unit-length again: two faces of one
#: person ~0.7 apart (their cosine ~1 / (1 + 0.57²)); two people's, nearly orthogonal, ~1.4.
FACE_SPREAD = 0.57 / np.sqrt(DIMENSION)
ENROLLED = 20  # the person enrolled: the 20th most frequent


class Calls:
    """Recognizer calls and picture reads made by celebscan's code while counting."""

    def __init__(self) -> None:
        self.recognizer = self.reads = 0

    def __enter__(self) -> Calls:
        from worker.recognizers.local import LocalRecognizer
        from worker.sources import FolderReader, S3Reader

        self._patched = [(LocalRecognizer, "recognize"), (FolderReader, "read"), (S3Reader, "read")]
        self._saved = [getattr(cls, name) for cls, name in self._patched]
        for (cls, name), original in zip(self._patched, self._saved, strict=True):
            setattr(cls, name, self._counting(name, original))
        return self

    def _counting(self, name, original):
        def counted(*args, **kwargs):
            if name == "recognize":
                self.recognizer += 1
            else:
                self.reads += 1
            return original(*args, **kwargs)

        return counted

    def __exit__(self, *exc) -> None:
        for (cls, name), original in zip(self._patched, self._saved, strict=True):
            setattr(cls, name, original)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def people_for(faces: int) -> int:
    return max(100, faces // 50)


def centres(people: int) -> np.ndarray:
    return MODEL.normalized(np.random.default_rng(7).normal(size=(people + 1, DIMENSION)))


def faces_of(centre: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A face of each person of ``centre`` (one a row): the centre plus noise, unit-length."""
    return MODEL.normalized(centre + rng.normal(scale=FACE_SPREAD, size=centre.shape))


def fill(store: ResultStore, faces: int, first_id: int = 1) -> np.ndarray:
    """``faces`` unnamed face rows with embeddings, two per picture, from image ``first_id`` on;
    the true person of each face, in id order."""
    people = people_for(faces)
    centre = centres(people)
    rng = np.random.default_rng(first_id)
    pictures = faces // 2
    with store.engine.begin() as conn:
        if first_id == 1:
            conn.execute(
                text(
                    "INSERT INTO scans (source, backend, created_at, listed, skipped) "
                    "VALUES ('s3://big/', 'local', now(), 0, 0)"
                )
            )
        conn.execute(
            text(
                "INSERT INTO images (scan_id, bucket, key, etag, size, backend, status, attempts) "
                "SELECT 1, 'big', 'img' || i || '.jpg', md5(i::text), 100000, 'local', 'done', 0 "
                "FROM generate_series(:a, :b) AS i"
            ),
            {"a": first_id, "b": first_id + pictures - 1},
        )
    step = 200_000
    truth = np.empty(faces, dtype=np.int32)
    raw = store.engine.raw_connection()
    try:
        for start in range(0, faces, step):
            count = min(step, faces - start)
            who = np.minimum(people, np.floor(np.exp(rng.random(count) * np.log(people + 1))).astype(np.int64))
            truth[start : start + count] = who
            vectors = faces_of(centre[who], rng)
            lines = io.StringIO()
            for offset, vector in enumerate(vectors):
                face = start + offset
                lines.write(
                    f"{first_id + face // 2}\t{face % 2}\t0.1\t0.1\t0.2\t0.2\t\\\\x{MODEL.pack(vector).hex()}\t"
                    f"{MODEL.id}\n"
                )
            lines.seek(0)
            with raw.cursor() as cursor:
                cursor.copy_expert(
                    "COPY faces (image_id, face_index, box_left, box_top, box_width, box_height, embedding, "
                    "embedding_model) FROM STDIN",
                    lines,
                )
            raw.commit()
    finally:
        raw.close()
    with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE faces"))
    return truth


def quality(store: ResultStore, truth: np.ndarray) -> tuple[float, float, float]:
    """Of the people with at least 3 faces: groups a person is split into (mean), the share of a
    person's faces in their largest group (mean); and the groups' purity (faces of the group's
    main person, over all grouped faces)."""
    groups = np.zeros(len(truth), dtype=np.int64)
    with store.engine.connect() as conn:
        for face_id, group in conn.execute(
            text("SELECT id, unknown_id FROM faces WHERE id <= :n AND unknown_id > 0"), {"n": len(truth)}
        ):
            groups[face_id - 1] = group
    grouped = groups > 0
    pairs = np.unique(np.stack([truth[grouped], groups[grouped]]), axis=1, return_counts=True)
    (person, group), count = pairs
    per_group_main = np.zeros(group.max() + 1, dtype=np.int64)
    np.maximum.at(per_group_main, group, count)
    purity = per_group_main.sum() / grouped.sum()
    faces_of = np.bincount(truth, minlength=truth.max() + 1)
    splits = np.bincount(person, minlength=len(faces_of))
    largest = np.zeros(len(faces_of), dtype=np.int64)
    np.maximum.at(largest, person, count)
    seen = faces_of >= 3
    return float(splits[seen].mean()), float((largest[seen] / faces_of[seen]).mean()), float(purity)


def baseline_seconds_per_picture(workdir: Path, copies: int = 5) -> tuple[float, int, int, int]:
    """``scan --force`` of the faces-dev pictures (×copies, each copy a file of its own bytes so none
    is a known picture), embedded, 2 processes: (seconds a picture, pictures, recognizer calls, reads)."""
    from producer.scan import ScanRequest, run_scan

    folder = workdir / "pictures"
    folder.mkdir()
    for copy in range(copies):
        for part in ("test", "extra"):
            for path in (FACES_DEV / part).iterdir():
                (folder / f"{copy}-{path.name}").write_bytes(path.read_bytes() + bytes([copy]))
    settings = Settings(database_url=f"sqlite:///{workdir / 'baseline.db'}", workers=2, backend="local")
    store = ResultStore.from_settings(settings)
    quiet = lambda *args, **kwargs: None  # noqa: E731
    run_scan(store, settings, ScanRequest(source=str(folder)), say=quiet)  # the first scan
    started = time.perf_counter()
    summary = run_scan(store, settings, ScanRequest(source=str(folder), force=True), say=quiet)
    seconds = time.perf_counter() - started
    pictures = summary.counts.get("done", 0) + summary.counts.get("failed", 0)
    return seconds / pictures, pictures, pictures, pictures


def measure(url: str, faces: int, workdir: Path, group: bool) -> dict[str, float]:
    store = ResultStore.connect(url)
    settings = Settings(database_url=url, face_index_dir=str(workdir / f"index-{faces}"))
    started = time.perf_counter()
    truth = fill(store, faces)
    figures: dict[str, float] = {"fill_s": time.perf_counter() - started}
    index = FaceIndex(store.engine, MODEL, settings.face_index_dir)
    started = time.perf_counter()
    index.refresh()
    figures["build_s"] = time.perf_counter() - started
    figures["rss_after_build_mb"] = rss_mb()

    fill(store, 10_000, first_id=faces // 2 + 1)  # a later scan's faces
    with store.engine.begin() as conn:
        from worker.faces import removals
        from worker.schema import faces as face_rows

        removals.forget(conn, face_rows.c.image_id <= 500)  # 1,000 faces erased
    refreshed = index.refresh()
    figures.update(refresh_s=refreshed.seconds, refresh_added=refreshed.added, refresh_removed=refreshed.removed)

    centre = centres(people_for(faces))
    rng = np.random.default_rng(99)
    model = MODEL
    timings, found = [], 0
    with Calls() as calls:
        for person in (3, 50, 400, 2_000, 9_000 % people_for(faces)):
            query = faces_of(centre[person : person + 1], rng)[0]
            started = time.perf_counter()
            index.refresh()
            found = len(find(store.engine, index, model, query))
            timings.append(time.perf_counter() - started)
        figures.update(find_s=statistics.median(timings), find_max_s=max(timings), find_last_pictures=found)
        started = time.perf_counter()  # as a new `celebscan find` process: the index read from its file
        cold = FaceIndex(store.engine, MODEL, settings.face_index_dir)
        cold.refresh()
        find(store.engine, cold, model, query)
        figures["cold_find_s"] = time.perf_counter() - started
        del cold

        photos = faces_of(np.repeat(centre[ENROLLED : ENROLLED + 1], 5, axis=0), rng)
        Gallery(store.engine).enroll_embeddings("person 20", model, ((f"photo {i}", v) for i, v in enumerate(photos)))
        started = time.perf_counter()
        labelled = Labeller(store.engine, settings, model).after_enrolling(["person 20"])
        figures.update(label_s=time.perf_counter() - started, labelled=labelled.changed)
        with store.engine.connect() as conn:
            figures["people_images"] = conn.execute(
                text("SELECT coalesce(sum(images), 0) FROM person_images WHERE name = 'person 20'")
            ).scalar_one()
        if group:
            started = time.perf_counter()
            grouped = Grouping(store.engine, index, model, settings.unknown_min_faces).run()
            figures["group_s"] = time.perf_counter() - started
            splits, kept_together, purity = quality(store, truth)
            figures.update(splits=splits, together=kept_together, purity=purity)
            figures.update(
                grouped=grouped.grouped,
                groups=grouped.new_groups,
                looked_at=grouped.looked_at,
            )
    figures.update(recognizer_calls=calls.recognizer, reads=calls.reads, rss_mb=rss_mb())
    store.engine.dispose()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--group-up-to", type=int, default=1_000_000, help="Group the unknown at sizes up to this.")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="faces-scale-"))
    ok = True
    try:
        per_picture, pictures, calls, reads = baseline_seconds_per_picture(workdir)
        print(
            f"baseline: scan --force of {pictures} faces-dev pictures: {per_picture * 1000:.0f} ms a picture, "
            f"{calls} recognizer calls, {reads} pictures read (one GetObject each from S3)"
        )
        for size in (int(s) for s in args.sizes.split(",")):
            with postgres_server() as url:
                figures = measure(url, size, workdir, group=size <= args.group_up_to)
            ok &= report(size, figures, per_picture)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


def report(size: int, f: dict[str, float], per_picture: float) -> bool:
    from producer.cost import paid_cost

    pictures = size // 2
    rescan_s = pictures * per_picture
    print(f"\n{size:,} stored faces ({pictures:,} pictures), written in {f['fill_s']:.0f} s")
    print(
        f"  index: first build {f['build_s']:.1f} s; refresh after +{f['refresh_added']:,.0f} faces and "
        f"-{f['refresh_removed']:,.0f} erased: {f['refresh_s']:.2f} s; peak RSS {f['rss_after_build_mb']:,.0f} MB"
    )
    print(
        f"  baseline rescan (scan --force) of {pictures:,} pictures: {rescan_s / 3600:,.1f} h on 2 cores, "
        f"{pictures:,} recognizer calls (Rekognition: ${paid_cost(Settings(), pictures):,.0f}), {pictures:,} reads"
    )
    print(
        f"  find: median {f['find_s']:.3f} s (max {f['find_max_s']:.3f} s; last: {f['find_last_pictures']:,.0f} "
        f"pictures) = {rescan_s / f['find_s']:,.0f}x faster than the rescan; in a new process (the index "
        f"read from its file first): {f['cold_find_s']:.2f} s"
    )
    print(
        f"  enroll one person, label every stored face: {f['label_s']:.1f} s, {f['labelled']:,.0f} faces named, "
        f"{f['people_images']:,.0f} pictures in people = {rescan_s / f['label_s']:,.0f}x faster than the rescan"
    )
    met = f["find_s"] < 1.0 and f["label_s"] < 60
    if "group_s" in f:
        print(
            f"  group {f['looked_at']:,.0f} unknown faces: {f['group_s']:.0f} s, {f['grouped']:,.0f} grouped into "
            f"{f['groups']:,.0f} unnamed people = {rescan_s / f['group_s']:,.0f}x faster than the rescan"
        )
        print(
            f"  grouping quality (synthetic truth; people with 3+ faces): {f['splits']:.2f} groups a person, "
            f"{f['together']:.1%} of a person's faces in their largest group, purity {f['purity']:.2%}"
        )
        met &= f["group_s"] < 600
    print(
        f"  recognizer calls: {f['recognizer_calls']:.0f} (baseline {pictures:,}); pictures read: {f['reads']:.0f}; "
        f"peak RSS {f['rss_mb']:,.0f} MB"
    )
    print(f"  target (find < 1 s, labelling < 60 s, grouping 1M < 10 min): {'OK' if met else 'MISSED'}")
    return met and f["recognizer_calls"] == 0 and f["reads"] == 0


if __name__ == "__main__":
    sys.exit(main())
