"""The face prefilter (`scan --prefilter-faces`): calls saved, money saved, time spent, faces missed.

Two sets: every photo of ../shared/datasets/faces-dev (train/, test/, extra/: all show at least one
person) and pictures without people that ship inside scikit-image and matplotlib, plus generated
ones. For each image: decode it as a worker does, then ask the local detector whether there is a
face. An image of people judged face-less is a miss (the scan would record it with nobody in it,
never asking Rekognition). Baseline: no prefilter, one paid call per image.

    python -m bench.prefilter
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from worker.faces.prefilter import FacePrefilter
from worker.media.images import ImageLimits, decode_image
from worker.settings import DEFAULT_REKOGNITION_PRICES

FACES_DEV = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "faces-dev"
#: scikit-image pictures with no person in them ("camera" and "astronaut" show people).
NO_PEOPLE_SKIMAGE = (
    "brick",
    "chelsea",
    "coffee",
    "coins",
    "colorwheel",
    "grass",
    "gravel",
    "horse",
    "hubble_deep_field",
    "immunohistochemistry",
    "logo",
    "moon",
    "page",
    "rocket",
    "text",
    "clock",
    "checkerboard",
)
PRICE = float(DEFAULT_REKOGNITION_PRICES.split(":")[0])


def people_images() -> dict[str, bytes]:
    return {
        str(path.relative_to(FACES_DEV)): path.read_bytes()
        for path in sorted(FACES_DEV.rglob("*"))
        if path.suffix.lower() in (".jpg", ".jpeg", ".png")
    }


def no_people_images() -> dict[str, bytes]:
    import skimage.data

    pictures = {}
    for name in NO_PEOPLE_SKIMAGE:
        try:
            pictures[f"skimage/{name}"] = np.asarray(getattr(skimage.data, name)())
        except Exception as exc:  # a picture this version of scikit-image does not ship
            print(f"  (skipping skimage {name}: {type(exc).__name__})")
    rng = np.random.default_rng(0)
    pictures["generated/noise"] = rng.integers(0, 255, (600, 800, 3), dtype=np.uint8)
    pictures["generated/gradient"] = np.tile(np.linspace(0, 255, 800, dtype=np.uint8), (600, 1))
    encoded = {}
    for name, pixels in pictures.items():
        buffer = io.BytesIO()
        Image.fromarray(pixels).convert("RGB").save(buffer, format="JPEG", quality=90)
        encoded[name] = buffer.getvalue()
    return encoded


def judge(prefilter: FacePrefilter, images: dict[str, bytes]) -> tuple[dict[str, bool], float]:
    """{name: a face found?} and the seconds per image (decoding included, as in a worker)."""
    found = {}
    started = time.perf_counter()
    for name, data in images.items():
        found[name] = prefilter.has_face(decode_image(data, ImageLimits()).pixels)
    return found, (time.perf_counter() - started) / len(images)


def main() -> int:
    if not FACES_DEV.is_dir():
        print(f"the faces-dev photo set is not at {FACES_DEV}")
        return 1
    prefilter = FacePrefilter()
    prefilter.has_face(np.zeros((100, 100, 3), dtype=np.uint8))  # load the models outside the timing
    with_people, no_people = people_images(), no_people_images()
    found_people, seconds_people = judge(prefilter, with_people)
    found_none, seconds_none = judge(prefilter, no_people)

    missed = sorted(name for name, face in found_people.items() if not face)
    false_faces = sorted(name for name, face in found_none.items() if face)
    saved = len(no_people) - len(false_faces) + len(missed)
    total = len(with_people) + len(no_people)
    print(f"images of people (faces-dev): {len(with_people)}; judged face-less (MISSED): {len(missed)} {missed}")
    print(
        f"images without people: {len(no_people)}; judged to have a face (sent anyway): {len(false_faces)} "
        f"{false_faces}"
    )
    print(f"baseline, no prefilter: {total} paid calls, ${total * PRICE:.4f} at ${PRICE}/image")
    print(
        f"with the prefilter: {total - saved} paid calls; saved {saved} calls = {saved / total:.0%}, "
        f"${saved * PRICE:.4f} ({saved * PRICE * 1e6 / total:,.0f} USD per million images of this mix)"
    )
    print(
        f"time: {seconds_people * 1000:.0f} ms per image of people, {seconds_none * 1000:.0f} ms per image "
        f"without (one core, decoding included)"
    )
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
