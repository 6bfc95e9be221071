"""Small image files made on the fly, for tests that need bytes of a particular kind."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def halves(width: int = 200, height: int = 120) -> Image.Image:
    """Left half red, right half blue: orientation is visible in the pixels."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(pixels)


def encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def jpeg(width: int = 200, height: int = 120) -> bytes:
    return encode(halves(width, height), "JPEG", quality=90)


def heic(image: Image.Image, **options) -> bytes:
    """``image`` as HEIC, the format iPhones save (pillow-heif's encoder, x265 inside its wheel)."""
    from worker.media.images import heif_decoder

    assert heif_decoder(), "pillow-heif is not installed"
    return encode(image, "HEIF", quality=90, **options)


def png_declaring(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width`` x ``height`` pixels: a decompression bomb's shape."""
    import struct
    import zlib

    data = bytearray(encode(Image.new("L", (8, 8)), "PNG"))
    ihdr = 8 + 4  # signature, then the IHDR chunk's length field
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


def jpeg_with_comment(data: bytes, comment: str) -> bytes:
    """The same JPEG with a COM segment after the start-of-image marker: other bytes, same pixels."""
    text = comment.encode()[:60000]
    return data[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + data[2:]
