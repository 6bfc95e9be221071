"""Local recognizer throughput over faces-dev, against the face_recognition command-line tool.

Both tools get the same images — every image in ``test/`` and ``extra/``, copied ``--copies``
times under other names so that start-up does not dominate — and the same gallery, one known
photo per person (the first in each ``train/<person>/``). Both run on 2 processes:
``face_recognition --cpus 2 KNOWN UNKNOWN`` and ``celebscan scan UNKNOWN --workers 2`` (after
``celebscan gallery import``, not timed). Target: ≥ 3× the baseline's images/s, with every expected
name found and no wrong name. Exits 1 when missed.

Needs the baseline tool beside dlib-bin: ``pip install --no-deps face-recognition``.

    python -m bench.local_recognizer [--copies 5]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FACES_DEV = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "faces-dev"
TARGET = 3.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if not (FACES_DEV / "expected.csv").is_file():
        sys.exit(f"faces-dev is not at {FACES_DEV}")
    if not shutil.which("face_recognition"):
        sys.exit("the baseline is missing: pip install --no-deps face-recognition")

    with open(FACES_DEV / "expected.csv", newline="") as handle:
        expected = {row["image"]: {n for n in row["expected_people"].split(";") if n} for row in csv.DictReader(handle)}
    with tempfile.TemporaryDirectory(prefix="celebscan-bench-") as scratch:
        work = Path(scratch)
        known, unknown, gallery = work / "known", work / "unknown", work / "gallery"
        for folder in (known, unknown):
            folder.mkdir()
        truth = {}
        for person_dir in sorted((FACES_DEV / "train").iterdir()):
            first = sorted(person_dir.iterdir())[0]
            shutil.copy(first, known / f"{person_dir.name}{first.suffix}")
            (gallery / person_dir.name).mkdir(parents=True)
            shutil.copy(first, gallery / person_dir.name / first.name)
        for image, people in expected.items():
            for copy in range(args.copies):
                name = f"{copy}-{image.replace('/', '-')}"
                shutil.copy(FACES_DEV / image, unknown / name)
                truth[name] = people
        count = len(truth)

        started = time.perf_counter()
        baseline_out = subprocess.run(
            ["face_recognition", "--cpus", str(args.workers), str(known), str(unknown)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        baseline_seconds = time.perf_counter() - started

        database = f"sqlite:///{work / 'bench.db'}"
        celebscan = [sys.executable, "-m", "producer.cli", "--database-url", database]
        subprocess.run([*celebscan, "gallery", "import", str(gallery)], capture_output=True, check=True)
        started = time.perf_counter()
        subprocess.run(
            [*celebscan, "scan", str(unknown), "--workers", str(args.workers)], capture_output=True, check=True
        )
        ours_seconds = time.perf_counter() - started
        results = subprocess.run([*celebscan, "results"], capture_output=True, text=True, check=True).stdout

    ours_found = {r["key"]: {c["name"] for c in r["celebrities"]} for r in map(json.loads, results.splitlines())}
    baseline_found: dict[str, set[str]] = {name: set() for name in truth}
    for line in baseline_out.splitlines():
        path, name = line.rsplit(",", 1)
        if name not in ("unknown_person", "no_persons_found"):
            baseline_found[Path(path).name].add(name)

    ours_ok, baseline_ok = _check(ours_found, truth), _check(baseline_found, truth)
    ours_rate, baseline_rate = count / ours_seconds, count / baseline_seconds
    ratio = ours_rate / baseline_rate
    print(f"{count} images ({len(expected)} x {args.copies} copies), {args.workers} processes, start-up included")
    print(
        f"baseline face_recognition --cpus {args.workers}: {baseline_rate:.2f} images/s "
        f"({baseline_seconds:.1f} s); {baseline_ok}"
    )
    print(f"celebscan scan --workers {args.workers}: {ours_rate:.2f} images/s ({ours_seconds:.1f} s); {ours_ok}")
    met = ratio >= TARGET and ours_ok == "all names right"
    print(f"ratio: {ratio:.1f}x (target >= {TARGET:.0f}x with all names right) {'OK' if met else 'MISSED'}")
    return 0 if met else 1


def _check(found: dict[str, set[str]], truth: dict[str, set[str]]) -> str:
    missing = sum(len(truth[k] - found.get(k, set())) for k in truth)
    wrong = sum(len(found.get(k, set()) - truth[k]) for k in truth)
    return "all names right" if not (missing or wrong) else f"{missing} names missing, {wrong} wrong"


if __name__ == "__main__":
    sys.exit(main())
