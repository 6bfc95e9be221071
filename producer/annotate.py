"""Pictures of results: an image with a box around each face, and names on the recognized ones."""

from __future__ import annotations

import io
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

from worker.read_models import ResultRecord
from worker.recognition import BoundingBox

RECOGNIZED = (40, 200, 90)
UNRECOGNIZED = (255, 170, 0)


def annotate(image: Image.Image, record: ResultRecord, max_side: int | None = None) -> Image.Image:
    """A copy of ``image`` (upright RGB), shrunk to ``max_side``, with the record's faces drawn on it."""
    picture = image.convert("RGB")
    if max_side and max(picture.size) > max_side:
        picture.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(picture)
    width, height = picture.size
    line = max(2, round(max(width, height) / 300))
    font = _font(max(12, round(max(width, height) / 40)))
    for face in record.unrecognized_faces:
        draw.rectangle(_pixels(face.bounding_box, width, height), outline=UNRECOGNIZED, width=line)
    for celebrity in record.celebrities:
        box = _pixels(celebrity.bounding_box, width, height)
        draw.rectangle(box, outline=RECOGNIZED, width=line)
        label = f"{celebrity.name} {celebrity.match_confidence:.0f}"
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        x, y = box[0], max(0, box[1] - (bottom - top) - 2 * line)
        draw.rectangle((x, y, x + right - left + 2 * line, y + bottom - top + 2 * line), fill=RECOGNIZED)
        draw.text((x + line - left, y + line - top), label, fill=(0, 0, 0), font=font)
    return picture


def jpeg_bytes(picture: Image.Image, quality: int = 80) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


def _pixels(box: BoundingBox, width: int, height: int) -> tuple[int, int, int, int]:
    """A relative box (Rekognition's shape) in pixel corners, clipped to the picture."""
    left = max(0, round(box.left * width))
    top = max(0, round(box.top * height))
    right = min(width - 1, round((box.left + box.width) * width))
    bottom = min(height - 1, round((box.top + box.height) * height))
    return left, top, max(left, right), max(top, bottom)


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)
