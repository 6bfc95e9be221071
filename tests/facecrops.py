"""Tight face crops, made at run time from faces-dev's pictures (never stored in the repository).

A celebrity set found on the web is often like this: each picture a face cut close to its box.
Every face of faces-dev's ``test/`` and ``extra/`` pictures is cut to its box, and to the box grown
by 10%, 25% and 50% of its size on each side. The boxes are the HOG detector's (the local
recognizer's before issue 29), each with who it is ("" for a face of nobody in the gallery), so
the set does not depend on the detector it measures.
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

MARGINS = (0.0, 0.1, 0.25, 0.5)
#: (picture, (left, top, right, bottom) in its upright pixels, who it is).
FACES = (
    ("test/alex_lacamoire1.jpg", (655, 203, 925, 473), "alex_lacamoire"),
    ("test/johnsnow_test1.jpg", (264, 174, 465, 375), "kit_harington"),
    ("test/kit_with_rose.jpg", (79, 130, 154, 204), "rose_leslie"),
    ("test/kit_with_rose.jpg", (247, 92, 354, 199), "kit_harington"),
    ("test/obama1.jpg", (569, 238, 942, 611), "obama"),
    ("test/obama_and_biden.jpg", (1141, 398, 1344, 600), "obama"),
    ("test/obama_and_biden.jpg", (736, 443, 938, 645), "biden"),
    ("test/obama_and_biden.jpg", (1604, 1072, 1744, 1213), ""),
    ("extra/two_people.jpg", (254, 56, 390, 194), "obama"),
    ("extra/two_people.jpg", (782, 59, 980, 257), "biden"),
    ("extra/obama-240p.jpg", (190, 32, 252, 94), "obama"),
    ("extra/obama_small.jpg", (107, 70, 218, 182), "obama"),
    ("extra/obama3.jpg", (652, 305, 936, 590), "obama"),
    ("extra/obama_partial_face.jpg", (-60, 152, 205, 391), "obama"),
    ("extra/32bit.png", (159, 294, 462, 596), "obama"),
    ("extra/lin-manuel-miranda.png", (241, 170, 562, 491), ""),
)


@dataclass(frozen=True)
class Crop:
    name: str
    person: str  # "" when the face is of nobody in the gallery
    data: bytes  # a JPEG


def tight_crops(faces_dev: Path) -> list[Crop]:
    """Every face of ``FACES`` at every margin of ``MARGINS``: 64 JPEGs."""
    from worker.media.images import ImageLimits, decode_image

    crops = []
    for picture, (left, top, right, bottom), person in FACES:
        pixels = decode_image((faces_dev / picture).read_bytes(), ImageLimits(min_side=1)).pixels
        height, width = pixels.shape[:2]
        for margin in MARGINS:
            grow_x, grow_y = round(margin * (right - left)), round(margin * (bottom - top))
            box = max(0, left - grow_x), max(0, top - grow_y), min(width, right + grow_x), min(height, bottom + grow_y)
            buffer = io.BytesIO()
            Image.fromarray(pixels[box[1] : box[3], box[0] : box[2]]).save(buffer, format="JPEG", quality=92)
            crops.append(Crop(f"{picture}: {person or 'a stranger'} at +{margin:.0%}", person, buffer.getvalue()))
    return crops


def verdict(person: str, faces: int, names: set[str]) -> str:
    """One crop's outcome: ``missed`` (no face found), ``right``, ``wrong`` (another name given) or
    ``unknown`` (the face found, nobody named)."""
    if not faces:
        return "missed"
    if names - {person}:
        return "wrong"
    return "right" if names == ({person} if person else set()) else "unknown"


def tally(verdicts) -> dict[str, int]:
    counts = Counter(verdicts)
    return {outcome: counts[outcome] for outcome in ("right", "wrong", "unknown", "missed")}
