"""The local recognizer over faces-dev, against the face_recognition command-line tool; tight crops; detection.

1. Throughput. Both tools get the same images — every image in ``test/`` and ``extra/``, copied
   ``--copies`` times under other names so that start-up does not dominate, each copy with a few
   bytes after its end (other bytes, same pixels: celebscan would otherwise recognize a picture
   once and copy its result to its copies) — and the same gallery, one known photo per person (the
   first in each ``train/<person>/``). Both run on 2 processes: ``face_recognition --cpus 2 KNOWN
   UNKNOWN`` and ``celebscan scan UNKNOWN --workers 2`` (after ``celebscan gallery import``, not
   timed), celebscan once before the baseline and once after it, into fresh databases, its time
   the mean of the two (others' load on this machine drifts over a baseline's minute). Target:
   ≥ 6× the baseline's images/s, with every expected name found and no wrong name.
2. Tight crops: every face of those pictures cut to its box and to 10–50% around it
   (``tests/facecrops.py``, made in a temporary folder), scanned with the same gallery: right,
   wrong, unknown (a face found, nobody named) and missed (no face found). Target: none missed,
   none wrong.
3. With ``--cpu-time``: the CPU time of each tool on one process (``--cpus 1``, ``--workers 1``,
   so that all of it is this process's children's), a figure that others' load on the machine
   does not change as it changes wall time.
4. Detection time per image, in this process, one thread: dlib's HOG as the local recognizer ran it
   before (downscaled to 1024 px, small images upsampled) against YuNet as it runs now
   (``worker.faces.detection``), on the faces-dev pictures and on the crops.

Exits 1 when a target is missed. Needs the baseline tool and dlib beside the test extra:
``pip install dlib-bin face-recognition-models && pip install --no-deps face-recognition``.

    python -m bench.local_recognizer [--copies 5] [--cpu-time]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.facecrops import tally, tight_crops, verdict

FACES_DEV = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "faces-dev"
TARGET = 6.0
BASELINE_INSTALL = "pip install dlib-bin face-recognition-models && pip install --no-deps face-recognition"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpu-time", action="store_true", help="also measure CPU seconds on one process each")
    args = parser.parse_args()
    if not (FACES_DEV / "expected.csv").is_file():
        sys.exit(f"faces-dev is not at {FACES_DEV}")
    if not shutil.which("face_recognition"):
        sys.exit(f"the baseline is missing: {BASELINE_INSTALL}")

    with open(FACES_DEV / "expected.csv", newline="") as handle:
        expected = {row["image"]: {n for n in row["expected_people"].split(";") if n} for row in csv.DictReader(handle)}
    with tempfile.TemporaryDirectory(prefix="celebscan-bench-") as scratch:
        work = Path(scratch)
        known, unknown, gallery, crops = work / "known", work / "unknown", work / "gallery", work / "crops"
        for folder in (known, unknown, crops):
            folder.mkdir()
        for person_dir in sorted((FACES_DEV / "train").iterdir()):
            first = sorted(person_dir.iterdir())[0]
            shutil.copy(first, known / f"{person_dir.name}{first.suffix}")
            (gallery / person_dir.name).mkdir(parents=True)
            shutil.copy(first, gallery / person_dir.name / first.name)
        truth = {}
        for image, people in expected.items():
            for copy in range(args.copies):
                name = f"{copy}-{image.replace('/', '-')}"
                (unknown / name).write_bytes((FACES_DEV / image).read_bytes() + f"copy {copy}".encode())
                truth[name] = people
        crop_people = {}
        for number, crop in enumerate(tight_crops(FACES_DEV)):
            (crops / f"{number:02d}.jpg").write_bytes(crop.data)
            crop_people[f"{number:02d}.jpg"] = crop.person
        count = len(truth)

        ours_times, ours_found = [], {}
        for attempt in range(2):
            celebscan = _Celebscan(work / f"bench-{attempt}.db")
            celebscan("gallery", "import", str(gallery))
            started = time.perf_counter()
            celebscan("scan", str(unknown), "--workers", str(args.workers))
            ours_times.append(time.perf_counter() - started)
            ours_found = _names(celebscan("results"))
            if attempt == 0:
                started = time.perf_counter()
                baseline_out = subprocess.run(
                    ["face_recognition", "--cpus", str(args.workers), str(known), str(unknown)],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                baseline_seconds = time.perf_counter() - started
        ours_seconds = sum(ours_times) / len(ours_times)

        if args.cpu_time:
            baseline_cpu = _cpu_seconds(["face_recognition", "--cpus", "1", str(known), str(unknown)])
            single = _Celebscan(work / "cpu.db")
            single("gallery", "import", str(gallery))
            ours_cpu = _cpu_seconds([*single.command, "scan", str(unknown), "--workers", "1"], single.env)

        crops_db = _Celebscan(work / "crops.db")
        crops_db("gallery", "import", str(gallery))
        crops_db("scan", str(crops), "--workers", str(args.workers))
        crop_outcomes = {
            key: verdict(crop_people[key], faces, names) for key, (faces, names) in _faces(crops_db("results")).items()
        }

    baseline_found: dict[str, set[str]] = {name: set() for name in truth}
    for line in baseline_out.splitlines():  # "path,name"; two processes' lines may run into each other
        path, _, name = line.rpartition(",")
        if Path(path).name in baseline_found and name not in ("unknown_person", "no_persons_found"):
            baseline_found[Path(path).name].add(name)

    ours_ok, baseline_ok = _check(ours_found, truth), _check(baseline_found, truth)
    ours_rate, baseline_rate = count / ours_seconds, count / baseline_seconds
    ratio = ours_rate / baseline_rate
    print(f"{count} images ({len(expected)} x {args.copies} copies), {args.workers} processes, start-up included")
    print(
        f"baseline face_recognition --cpus {args.workers}: {baseline_rate:.2f} images/s "
        f"({baseline_seconds:.1f} s); {baseline_ok}"
    )
    print(
        f"celebscan scan --workers {args.workers}: {ours_rate:.2f} images/s "
        f"({' and '.join(f'{t:.1f}' for t in ours_times)} s, before and after the baseline); {ours_ok}"
    )
    met = ratio >= TARGET and ours_ok == "all names right"
    print(f"ratio: {ratio:.1f}x (target >= {TARGET:.0f}x with all names right) {'OK' if met else 'MISSED'}")
    if args.cpu_time:
        print(
            f"CPU time on one process, start-up included: baseline {baseline_cpu:.1f} s, celebscan "
            f"{ours_cpu:.1f} s: {baseline_cpu / ours_cpu:.1f}x"
        )

    counts = tally(crop_outcomes.get(key, "missed") for key in crop_people)
    crops_met = counts["missed"] == 0 and counts["wrong"] == 0
    print(
        f"tight crops: {len(crop_people)} faces of faces-dev cut to their box and 10-50% around it: "
        + ", ".join(f"{n} {outcome}" for outcome, n in counts.items())
        + f" (target: none missed, none wrong) {'OK' if crops_met else 'MISSED'}"
    )
    for key, outcome in sorted(crop_outcomes.items()):
        if outcome != "right":
            print(f"  {outcome}: {key} ({crop_people[key] or 'a stranger'})")
    _print_detection_times(expected)
    return 0 if met and crops_met else 1


class _Celebscan:
    """The ``celebscan`` command as a user runs it (the script pip installed beside this Python)."""

    def __init__(self, database: Path) -> None:
        script = Path(sys.executable).parent / "celebscan"
        program = [str(script)] if script.is_file() else [sys.executable, "-m", "producer.cli"]
        self.command = [*program, "--database-url", f"sqlite:///{database}"]
        # The crops of the smallest faces are under the 80 px a scan refuses by default.
        self.env = {**os.environ, "CELEBSCAN_MIN_IMAGE_SIDE": "16"}

    def __call__(self, *args: str) -> str:
        return subprocess.run([*self.command, *args], capture_output=True, text=True, check=True, env=self.env).stdout


def _cpu_seconds(command: list[str], env: dict[str, str] | None = None) -> float:
    """User + system CPU seconds of ``command``, a process that makes no process of its own."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(command, capture_output=True, check=True, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def _names(results: str) -> dict[str, set[str]]:
    return {key: names for key, (_, names) in _faces(results).items()}


def _faces(results: str) -> dict[str, tuple[int, set[str]]]:
    """{key: (faces found, names)} from ``celebscan results``' JSON lines; a failed image found none."""
    found = {}
    for record in map(json.loads, results.splitlines()):
        names = {c["name"] for c in record["celebrities"]}
        found[record["key"]] = (len(record["celebrities"]) + len(record["unrecognized_faces"]), names)
    return found


def _check(found: dict[str, set[str]], truth: dict[str, set[str]]) -> str:
    missing = sum(len(truth[k] - found.get(k, set())) for k in truth)
    wrong = sum(len(found.get(k, set()) - truth[k]) for k in truth)
    return "all names right" if not (missing or wrong) else f"{missing} names missing, {wrong} wrong"


def _print_detection_times(expected: dict[str, set[str]]) -> None:
    from worker.faces.detection import FaceDetector
    from worker.media.images import ImageLimits, decode_image

    pictures = [decode_image((FACES_DEV / image).read_bytes()).pixels for image in expected]
    crops = [decode_image(crop.data, ImageLimits(min_side=1)).pixels for crop in tight_crops(FACES_DEV)]
    detectors = {"YuNet (now)": FaceDetector().detect}
    try:
        detectors["HOG (before)"] = _hog_as_before()
    except ImportError:
        print(f"  (HOG not measured: dlib is not installed; {BASELINE_INSTALL})")
    for name, detect in detectors.items():
        detect(pictures[0])  # warm up
        times = []
        for images in (pictures, crops):
            started = time.perf_counter()
            for pixels in images:
                detect(pixels)
            times.append(1000 * (time.perf_counter() - started) / len(images))
        print(f"detection, {name}: {times[0]:.1f} ms per faces-dev picture, {times[1]:.1f} ms per crop (one thread)")


def _hog_as_before():
    """dlib's frontal (HOG) detector as the local recognizer ran it until issue 29."""
    import dlib
    import numpy as np
    from PIL import Image

    detector = dlib.get_frontal_face_detector()

    def detect(pixels):
        scale = min(1.0, 1024 / max(pixels.shape[:2]))
        if scale < 1.0:
            size = (round(pixels.shape[1] * scale), round(pixels.shape[0] * scale))
            pixels = np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR))
        longest = max(pixels.shape[:2])
        return detector.run(pixels, 2 if longest < 400 else 1 if longest < 800 else 0, 0.2)

    return detect


if __name__ == "__main__":
    sys.exit(main())
