"""Decoding and preparing one image: the bytes of an object in, RGB pixels with the right way up out.

Everything Pillow can read is accepted and converted to 8-bit RGB (CMYK, 16-bit, palette with
transparency, alpha, animated — first frame), and HEIC/HEIF, the format phones save by default,
through ``pillow-heif`` (the ``local`` extra; its wheels ship libheif). EXIF orientation is applied so
that faces are upright (for HEIF, libheif applies the picture's rotation as it decodes and
pillow-heif resets the EXIF tag, so nothing is turned twice). Each way an input can be unusable
raises its own typed error with a stable code.
"""

from __future__ import annotations

import functools
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from worker.errors import ImageTooLargeError, ImageTooSmallError, InvalidImageError

log = logging.getLogger(__name__)

#: File names celebscan treats as images (others are not listed or enrolled).
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".heic", ".heif"}
)

#: Transparent areas are composited onto this colour before recognition.
BACKGROUND = (255, 255, 255)

#: The ``ftyp`` brands of HEIC/HEIF files (ISO base media: bytes 4 to 12).
HEIF_BRANDS = (b"ftypheic", b"ftypheix", b"ftypheim", b"ftypheis", b"ftyphevc", b"ftypmif1", b"ftypmsf1")
HEIF_INSTALL_HINT = "pip install '.[local]' in a clone of celebscan (pillow-heif)"


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = 100_000_000
    min_side: int = 80


@dataclass(frozen=True, eq=False)
class LoadedImage:
    """An upright 8-bit RGB image ready for a recognizer, and the bytes it came from."""

    pixels: np.ndarray
    format: str
    data: bytes
    #: True when EXIF orientation turned the stored pixels; ``data`` then shows them on their side.
    rotated: bool = False

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


def is_image_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> LoadedImage:
    if not data:
        raise InvalidImageError("the object is empty (0 bytes)", code="EmptyObject")
    image = _open(data, limits)
    rotated = _rotated(image)
    pixels = _load_rgb(image)
    height, width = pixels.shape[:2]
    if min(width, height) < limits.min_side:
        raise ImageTooSmallError(
            f"image is {width}x{height} px; the smallest side must be at least {limits.min_side} px"
        )
    return LoadedImage(pixels=pixels, format=image.format or "unknown", data=data, rotated=rotated)


@functools.cache
def heif_decoder() -> bool:
    """Teach Pillow to read HEIC/HEIF (once per process, on the first decode: importing pillow-heif
    takes 40 ms that the CLI's other commands need not pay); False when pillow-heif is missing."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return False
    register_heif_opener()
    return True


def _open(data: bytes, limits: ImageLimits) -> Image.Image:
    heif_decoder()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise InvalidImageError(f"not an image in a format celebscan can read ({_sniff(data)})") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"declared size is a decompression bomb: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # libheif refuses a truncated file as it opens it
        raise InvalidImageError(f"corrupt or truncated image ({_sniff(data)}): {exc}", code="CorruptImage") from exc
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height:,} px; the limit is {limits.max_pixels:,} px"
        )
    return image


def _load_rgb(image: Image.Image) -> np.ndarray:
    try:
        image.load()
        upright = _upright(image)
        return np.asarray(_to_rgb(upright), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImageError(f"corrupt or truncated {image.format} image: {exc}", code="CorruptImage") from exc


def _upright(image: Image.Image) -> Image.Image:
    if not _rotated(image):
        return image
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block must not cost the image; use the pixels as stored
        log.warning("ignoring unreadable EXIF orientation", exc_info=True)
        return image


def _rotated(image: Image.Image) -> bool:
    try:
        return image.getexif().get(0x0112, 1) not in (1, None)
    except Exception:
        return False


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _scale_to_8bit(image).convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, BACKGROUND)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image if mode == "RGB" else image.convert("RGB")


def _scale_to_8bit(image: Image.Image) -> Image.Image:
    """Map 16-bit and 32-bit grey levels to 0–255 (Pillow's own convert clips instead of scaling)."""
    values = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") else max(float(values.max()), 1.0)
    return Image.fromarray(np.clip(values * (255.0 / top), 0, 255).astype(np.uint8), mode="L")


def _sniff(data: bytes) -> str:
    head = data[:64].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        return "looks like an HTML page"
    if head[:5] in (b"%pdf-",):
        return "looks like a PDF"
    if data[4:12] in HEIF_BRANDS:
        if heif_decoder():
            return "HEIC/HEIF that libheif cannot read"
        return f"HEIC/HEIF, which this installation has no decoder for: {HEIF_INSTALL_HINT}"
    try:
        data[:256].decode("utf-8")
        return "looks like text"
    except UnicodeDecodeError:
        return f"first bytes {data[:8].hex()}"


def encode_jpeg_within(pixels: np.ndarray, max_bytes: int, quality: int = 90) -> bytes:
    """JPEG bytes of ``pixels``, shrunk until they fit in ``max_bytes``."""
    image = Image.fromarray(pixels)
    while True:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        if buffer.tell() <= max_bytes:
            return buffer.getvalue()
        scale = 0.9 * (max_bytes / buffer.tell()) ** 0.5
        image = image.resize(
            (max(1, int(image.width * scale)), max(1, int(image.height * scale))), Image.Resampling.LANCZOS
        )
