"""Videos the tests make themselves: short clips encoded with PyAV from pictures (the faces-dev
photos, or plain colours), and headers crafted to claim what no test should have to encode (a
seven-hour video). Nothing here is committed as a file."""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

#: (container format, codec, file suffix) of each kind of clip the tests make.
KINDS = {
    "mp4": ("mp4", "libx264", ".mp4"),
    "mov": ("mov", "libx264", ".mov"),
    "avi": ("avi", "libx264", ".avi"),
    "mkv": ("matroska", "libx264", ".mkv"),
    "webm": ("webm", "libvpx-vp9", ".webm"),
    "mp4-mpeg4": ("mp4", "mpeg4", ".mp4"),
    "mp4-hevc": ("mp4", "libx265", ".mp4"),
}

Scene = tuple["Path | np.ndarray", float]  # a picture (a file, or RGB pixels) and how many seconds it shows


def clip(
    scenes: Sequence[Scene],
    *,
    kind: str = "mp4",
    fps: int = 5,
    size: tuple[int, int] = (320, 240),
) -> bytes:
    """A clip showing each scene's picture, letterboxed into ``size``, for its seconds (an MP4 or
    MOV keeps its ``moov`` box at the end, as a camera's file does without "faststart")."""
    container_format, codec, _ = KINDS[kind]
    out = io.BytesIO()
    with _quiet_av().open(out, mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, fps)
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "crf": "28"}
        elif codec == "libx265":
            stream.options = {"preset": "ultrafast", "x265-params": "log-level=none"}
        elif codec == "libvpx-vp9":
            stream.options = {"deadline": "realtime", "cpu-used": "8"}
        pts = 0
        for picture, seconds in scenes:
            pixels = letterboxed(picture, size)
            for _ in range(max(1, round(seconds * fps))):
                frame = _quiet_av().VideoFrame.from_ndarray(pixels, format="rgb24")
                frame.pts = pts
                pts += 1
                for packet in stream.encode(frame):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def letterboxed(picture: Path | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    image = Image.open(picture).convert("RGB") if isinstance(picture, Path) else Image.fromarray(picture)
    image.thumbnail(size)
    canvas = Image.new("RGB", size, (20, 20, 20))
    canvas.paste(image, ((size[0] - image.width) // 2, (size[1] - image.height) // 2))
    return np.asarray(canvas)


def colour(rgb: tuple[int, int, int], size: tuple[int, int] = (320, 240)) -> np.ndarray:
    return np.full((size[1], size[0], 3), rgb, dtype=np.uint8)


def suffix(kind: str) -> str:
    return KINDS[kind][2]


def _quiet_av():
    import av

    av.logging.set_level(av.logging.ERROR)
    return av


# -- crafted headers ---------------------------------------------------------------------------------


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


def mp4_header(
    seconds: float,
    fourcc: bytes = b"avc1",
    size: tuple[int, int] = (1280, 720),
    brand=b"isom",
    media_bytes: int = 0,
    header_last: bool = False,
) -> bytes:
    """An MP4 whose header says ``seconds`` long, ``fourcc`` coded and ``size``, and an ``mdat`` of
    ``media_bytes`` zeros (before the header with ``header_last``, as a camera writes it): enough
    for a probe, nothing to decode."""
    timescale = 1000
    mvhd = _box(b"mvhd", struct.pack(">B3xIIII", 0, 0, 0, timescale, round(seconds * timescale)) + bytes(80))
    hdlr = _box(b"hdlr", bytes(4) + bytes(4) + b"vide" + bytes(12) + b"video\x00")
    entry = struct.pack(">I4s6xH16xHH", 86, fourcc, 1, *size) + bytes(50)
    stsd = _box(b"stsd", struct.pack(">II", 0, 1) + entry)
    stbl = _box(b"stbl", stsd)
    minf = _box(b"minf", stbl)
    mdia = _box(b"mdia", hdlr + minf)
    trak = _box(b"trak", mdia)
    moov = _box(b"moov", mvhd + trak)
    ftyp = _box(b"ftyp", brand + struct.pack(">I", 0) + brand)
    mdat = _box(b"mdat", bytes(media_bytes))
    return ftyp + mdat + moov if header_last else ftyp + moov + mdat
