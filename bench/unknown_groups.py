"""How well the unknown are grouped, on the faces-dev photos (all 21 pictures scanned with an empty
gallery, so every face is unknown).

Truth per face: the person the local recognizer names it with train/ enrolled (right on every
dev picture, see bench/local_recognizer.py), else "someone else". For each setting of
``CELEBSCAN_UNKNOWN_MAX_DISTANCE`` (``--distances``) and ``CELEBSCAN_UNKNOWN_MIN_FACES``
(``--min-faces``): how many groups each true person with at least min_faces + 1 faces is split
into, how many of their faces are grouped, and how pure the groups are (faces of the group's main
person over all its faces). Baseline: the gallery's own naming (one group per person, purity 100%).
It also prints the gap the distance must fall in: the largest distance between two faces of one
person and the smallest between faces of two people (SFace's unit-length embeddings: 0 to 2).

    python -m bench.unknown_groups [--distances 0.8,0.9,1.0,1.1,1.2] [--min-faces 2,3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from sqlalchemy import select, update

from producer.scan import ScanRequest, run_scan
from worker.faces import stored
from worker.faces.gallery import Gallery
from worker.faces.grouping import Grouping
from worker.faces.index import FaceIndex
from worker.faces.labelling import Labeller
from worker.faces.models import CURRENT
from worker.schema import faces, people, unknown_people
from worker.settings import Settings
from worker.store import ResultStore

FACES_DEV = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "faces-dev"


def scanned(workdir: Path) -> tuple[ResultStore, Settings, dict[int, str]]:
    """Every dev picture scanned with an empty gallery, and each face's true person."""
    folder = workdir / "pictures"
    folder.mkdir()
    for path in FACES_DEV.rglob("*"):
        if path.is_file() and path.suffix.lower() in (".jpg", ".jpeg", ".png"):
            (folder / f"{path.parent.name}-{path.name}").write_bytes(path.read_bytes())
    settings = Settings(
        database_url=f"sqlite:///{workdir / 'dev.db'}", workers=2, backend="local", face_index_dir=str(workdir / "ix")
    )
    store = ResultStore.from_settings(settings)
    run_scan(store, settings, ScanRequest(source=str(folder)), say=lambda *a, **k: None)
    from producer.cli import _embedder

    Gallery(store.engine).import_folder(FACES_DEV / "train", _embedder(settings))
    Labeller(store.engine, settings).after_enrolling([p.name for p in (FACES_DEV / "train").iterdir()])
    with store.engine.begin() as conn:
        truth = {face_id: name or "someone else" for face_id, name in conn.execute(select(faces.c.id, faces.c.name))}
        # unknown again: the names only served as the truth
        conn.execute(update(faces).values(name=None, person_id=None, labelled_by=None, match_confidence=None))
        conn.execute(people.delete())
    return store, settings, truth


def distance_gap(store: ResultStore, truth: dict[int, str]) -> tuple[float, float]:
    """(largest distance between two faces of one person, smallest between faces of two people)."""
    embeddings = next(stored.read_chunks(store.engine, CURRENT))
    people = np.array([truth[int(face_id)] for face_id in embeddings.face_ids])
    vectors = embeddings.vectors
    distances = np.linalg.norm(vectors[:, None, :] - vectors[None, :, :], axis=2)
    known = people != "someone else"
    same = (people[:, None] == people[None, :]) & known[:, None] & ~np.eye(len(people), dtype=bool)
    other = (people[:, None] != people[None, :]) & (known[:, None] | known[None, :])
    return float(distances[same].max()), float(distances[other].min())


def measure(store: ResultStore, settings: Settings, truth: dict[int, str], distance: float, min_faces: int):
    with store.engine.begin() as conn:
        conn.execute(update(faces).values(unknown_id=None))
        conn.execute(unknown_people.delete())
    index = FaceIndex(store.engine, CURRENT, settings.face_index_dir)
    index.refresh()
    Grouping(store.engine, index, CURRENT.tuned(group_distance=distance), min_faces).run()
    with store.engine.connect() as conn:
        grouped = dict(conn.execute(select(faces.c.id, faces.c.unknown_id).where(faces.c.unknown_id > 0)).all())
    by_group: dict[int, Counter] = defaultdict(Counter)
    for face_id, group in grouped.items():
        by_group[group][truth[face_id]] += 1
    purity = sum(max(c.values()) for c in by_group.values()) / max(1, len(grouped))
    faces_of = Counter(truth.values())
    lines = []
    for person, count in sorted(faces_of.items()):
        if person == "someone else" or count <= min_faces:
            continue
        groups = [g for g, c in by_group.items() if c[person]]
        in_groups = sum(by_group[g][person] for g in groups)
        lines.append(f"{person} {count} faces: {len(groups)} group(s), {in_groups} grouped")
    return len(by_group), purity, lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--distances", default="0.8,0.9,1.0,1.1,1.2")
    parser.add_argument("--min-faces", default="2,3")
    args = parser.parse_args()
    if not (FACES_DEV / "expected.csv").is_file():
        print(f"the faces-dev set is not at {FACES_DEV}")
        return 1
    with tempfile.TemporaryDirectory() as workdir:
        store, settings, truth = scanned(Path(workdir))
        print(f"{len(truth)} faces: {dict(Counter(truth.values()))}")
        same, other = distance_gap(store, truth)
        print(f"{CURRENT.id}: one person's faces up to {same:.3f} apart, two people's from {other:.3f}")
        print("baseline (the gallery's naming): 1 group a person, purity 100%")
        for min_faces in (int(m) for m in args.min_faces.split(",")):
            for distance in (float(d) for d in args.distances.split(",")):
                groups, purity, lines = measure(store, settings, truth, distance, min_faces)
                print(
                    f"min faces {min_faces}, distance {distance}: {groups} groups, purity {purity:.0%}; "
                    + "; ".join(lines)
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
