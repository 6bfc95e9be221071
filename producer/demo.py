"""`celebscan demo`: a sample scan made only from images that ship inside installed packages.

Grace Hopper comes with matplotlib, Eileen Collins (scikit-image's ``astronaut``) with scikit-image.
One photo of each is enrolled; the scan then sees other images made from them — resized, stored
rotated with an EXIF orientation, re-encoded, side by side, a PNG with alpha — plus pictures with no
person and one broken file, so every kind of outcome shows up in the table.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from worker.errors import MissingDependencyError

HOPPER, COLLINS = "Grace Hopper", "Eileen Collins"
DEMO_INSTALL_HINT = "pip install '.[local,demo]' in a clone of celebscan"


@dataclass(frozen=True)
class DemoSet:
    gallery: Path  # gallery/<person>/<photo>
    images: Path
    expected: dict[str, frozenset[str]]  # image name -> people in it; absent: expected to fail


def build_demo_set(folder: Path) -> DemoSet:
    hopper, collins = _sample_photos()
    gallery, images = folder / "gallery", folder / "images"
    for path in (gallery / HOPPER, gallery / COLLINS, images):
        path.mkdir(parents=True, exist_ok=True)
    hopper.save(gallery / HOPPER / "grace_hopper.jpg", quality=95)
    collins.save(gallery / COLLINS / "astronaut.png")

    makers: dict[str, tuple[Callable[[Path], object], set[str] | None]] = {
        "hopper_half_size.jpg": (lambda p: _resized(hopper, 0.5).save(p, quality=90), {HOPPER}),
        "hopper_reencoded.png": (lambda p: hopper.save(p), {HOPPER}),
        "collins_exif_rotated.jpg": (lambda p: _save_exif_rotated(collins, p), {COLLINS}),
        "collins_low_quality.jpg": (lambda p: collins.save(p, quality=35), {COLLINS}),
        "collins_alpha.png": (lambda p: _with_transparent_border(collins).save(p), {COLLINS}),
        "hopper_and_collins.jpg": (lambda p: _side_by_side(hopper, collins).save(p, quality=90), {HOPPER, COLLINS}),
        "coffee.jpg": (lambda p: _skimage_picture("coffee").save(p, quality=90), set()),
        "cat.jpg": (lambda p: _skimage_picture("chelsea").save(p, quality=90), set()),
        "gradient.png": (lambda p: _gradient().save(p), set()),
        "broken.jpg": (lambda p: p.write_bytes(_jpeg_bytes(hopper)[:2000]), None),
    }
    expected = {}
    for name, (make, people) in makers.items():
        make(images / name)
        if people is not None:
            expected[name] = frozenset(people)
    return DemoSet(gallery=gallery, images=images, expected=expected)


def _sample_photos() -> tuple[Image.Image, Image.Image]:
    try:
        import matplotlib.cbook
        import skimage.data
    except ImportError as exc:
        raise MissingDependencyError(f"the demo's sample images need {exc.name}: {DEMO_INSTALL_HINT}") from exc
    hopper = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    return hopper, Image.fromarray(skimage.data.astronaut())


def _skimage_picture(name: str) -> Image.Image:
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def _resized(image: Image.Image, scale: float) -> Image.Image:
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)


def _save_exif_rotated(image: Image.Image, path: Path) -> None:
    """Store the pixels turned on their side with EXIF orientation 6 ("rotate 90° clockwise to view")."""
    exif = Image.Exif()
    exif[0x0112] = 6
    image.transpose(Image.Transpose.ROTATE_90).save(path, quality=90, exif=exif)


def _with_transparent_border(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    alpha = np.full((image.height, image.width), 255, dtype=np.uint8)
    alpha[:40, :] = alpha[-40:, :] = alpha[:, :40] = alpha[:, -40:] = 0
    rgba.putalpha(Image.fromarray(alpha))
    return rgba


def _side_by_side(left: Image.Image, right: Image.Image) -> Image.Image:
    height = max(left.height, right.height)
    canvas = Image.new("RGB", (left.width + right.width, height), (255, 255, 255))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width, 0))
    return canvas


def _gradient() -> Image.Image:
    ramp = np.linspace(0, 255, 400, dtype=np.uint8)
    pixels = np.stack([np.tile(ramp, (300, 1)), np.tile(ramp[::-1], (300, 1)), np.full((300, 400), 128, np.uint8)], -1)
    return Image.fromarray(pixels)


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()
