"""Videos: what a video object is, read from its container's header without decoding, and its
frames, sampled in bounded memory whatever its length.

:func:`probe` reads a video's format, codec, duration and size from the header of an MP4 or MOV
(ISO base media boxes), an AVI (RIFF chunks) or a Matroska/WebM file (EBML elements), through
:class:`ByteRanges`, so an object in S3 is probed with a few range requests (an MP4 written without
"faststart" keeps its ``moov`` box at the end: the boxes before it are skipped by their headers).
:func:`sample_frames` decodes with PyAV (whose wheels ship FFmpeg), keeps one frame in memory at a
time, and reads the object through a seekable file over the same ranges, so a video in S3 is never
downloaded whole, and a run can resume a long video from where the previous one stopped.
"""

from __future__ import annotations

import io
import logging
import struct
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Protocol

import numpy as np

from worker.errors import InvalidVideoError, MissingDependencyError

log = logging.getLogger(__name__)

#: File names celebscan treats as videos (listed beside the images, scanned by both backends).
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm"})
#: ``images.media`` of a video's row (an image's is NULL).
VIDEO = "video"


def is_video_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in VIDEO_SUFFIXES


def media_of(key: str) -> str | None:
    """What a listed object's row holds: :data:`VIDEO`, or None for an image."""
    return VIDEO if is_video_name(key) else None


class ByteRanges(Protocol):
    """An object's bytes, read a range at a time (an S3 object by ``Range`` requests, a file by seeks)."""

    size: int

    def read(self, start: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``start`` (fewer only at the end)."""
        ...


@dataclass(frozen=True)
class VideoInfo:
    """What a video's header says."""

    format: str  # mp4, mov, avi, matroska, webm
    codec: str | None  # h264, hevc, mpeg4, vp8, vp9, av1, mjpeg, ... (None: the header names none)
    duration_ms: int | None  # None: the header does not say (a stream written without it)
    width: int | None = None
    height: int | None = None

    @property
    def minutes(self) -> float | None:
        return None if self.duration_ms is None else self.duration_ms / 60_000


def probe(ranges: ByteRanges) -> VideoInfo:
    """The video's format, codec, duration and size, from its header alone.

    Raises :class:`InvalidVideoError` for anything it cannot read: ``EmptyObject`` (0 bytes),
    ``InvalidVideoFormat`` (not one of the containers above), ``CorruptVideo`` (a header that is
    truncated or broken, or no video track).
    """
    if ranges.size == 0:
        raise InvalidVideoError("the object is empty (0 bytes)", code="EmptyObject")
    blocks = _Blocks(ranges)
    magic = blocks.read(0, 12)
    try:
        if magic[4:8] in _ISO_FIRST_BOXES:
            return _probe_iso(blocks)
        if magic[:4] == b"RIFF" and magic[8:12] == b"AVI ":
            return _probe_avi(blocks)
        if magic[:4] == b"\x1a\x45\xdf\xa3":
            return _probe_ebml(blocks)
    except (struct.error, IndexError, ValueError) as exc:
        raise InvalidVideoError(f"the video's header is broken: {exc}", code="CorruptVideo") from exc
    raise InvalidVideoError(f"not a video celebscan can read (it starts with {magic[:8]!r})")


# -- reading ranges -------------------------------------------------------------------------------


class BytesRanges:
    """Bytes already in memory as :class:`ByteRanges` (tests, small objects)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.size = data, len(data)

    def read(self, start: int, length: int) -> bytes:
        return self.data[start : start + length]


class _Blocks:
    """Aligned blocks of an object, the last few kept: a header's many small reads cost a few ranges."""

    BLOCK = 64 * 1024
    KEPT = 16

    def __init__(self, ranges: ByteRanges) -> None:
        self.ranges, self.size = ranges, ranges.size
        self._kept: OrderedDict[int, bytes] = OrderedDict()

    def read(self, start: int, length: int) -> bytes:
        end = min(start + length, self.size)
        parts = []
        for number in range(start // self.BLOCK, (max(end, start + 1) - 1) // self.BLOCK + 1):
            block = self._block(number)
            base = number * self.BLOCK
            parts.append(block[max(0, start - base) : max(0, end - base)])
        return b"".join(parts)

    def _block(self, number: int) -> bytes:
        if number in self._kept:
            self._kept.move_to_end(number)
            return self._kept[number]
        block = self.ranges.read(number * self.BLOCK, self.BLOCK)
        self._kept[number] = block
        if len(self._kept) > self.KEPT:
            self._kept.popitem(last=False)
        return block


class RangeFile(io.RawIOBase):
    """A read-only, seekable file over :class:`ByteRanges`, for a decoder that reads and seeks."""

    def __init__(self, ranges: ByteRanges) -> None:
        self.ranges, self.position = ranges, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.ranges.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer) -> int:
        wanted = min(len(buffer), self.ranges.size - self.position)
        if wanted <= 0:
            return 0
        data = self.ranges.read(self.position, wanted)
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)


# -- ISO base media (MP4, MOV) -----------------------------------------------------------------------

_ISO_FIRST_BOXES = frozenset({b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot"})
_ISO_CODECS = {
    "avc1": "h264",
    "avc3": "h264",
    "hvc1": "hevc",
    "hev1": "hevc",
    "mp4v": "mpeg4",
    "vp08": "vp8",
    "vp09": "vp9",
    "av01": "av1",
    "jpeg": "mjpeg",
    "mjpa": "mjpeg",
    "apcn": "prores",
    "apch": "prores",
}


def _iso_boxes(blocks: _Blocks, start: int, end: int) -> Iterator[tuple[str, int, int]]:
    """(type, payload start, box end) of each box between ``start`` and ``end``."""
    offset = start
    while offset + 8 <= end:
        header = blocks.read(offset, 16)
        if len(header) < 8:
            raise ValueError(f"a box header at byte {offset} is cut off")
        size, kind = struct.unpack(">I4s", header[:8])
        head = 8
        if size == 1:
            size, head = struct.unpack(">Q", header[8:16])[0], 16
        elif size == 0:
            size = end - offset
        if size < head:
            raise ValueError(f"a box at byte {offset} has size {size}")
        if offset + size > end:
            raise ValueError(f"the {kind.decode('latin-1')!r} box at byte {offset} runs past the end")
        yield kind.decode("latin-1"), offset + head, offset + size
        offset += size


def _child(blocks: _Blocks, start: int, end: int, kind: str) -> tuple[int, int] | None:
    return next(((s, e) for k, s, e in _iso_boxes(blocks, start, end) if k == kind), None)


def _probe_iso(blocks: _Blocks) -> VideoInfo:
    container, moov = "mp4", None
    try:
        for kind, start, end in _iso_boxes(blocks, 0, blocks.size):
            if kind == "ftyp" and blocks.read(start, 4) == b"qt  ":
                container = "mov"
            elif kind == "moov":
                moov = (start, end)
                break
    except ValueError as exc:
        if moov is None:
            raise InvalidVideoError(f"the video is cut off before its header: {exc}", code="CorruptVideo") from exc
    if moov is None:
        raise InvalidVideoError("the video has no 'moov' header box (cut off, or not finished)", code="CorruptVideo")
    timescale, duration = _movie_duration(blocks, *moov)
    for kind, start, end in _iso_boxes(blocks, *moov):
        if kind == "trak" and (track := _video_track(blocks, start, end)) is not None:
            codec, width, height = track
            duration_ms = round(1000 * duration / timescale) if duration and timescale else None
            return VideoInfo(container, codec, duration_ms, width, height)
    raise InvalidVideoError("the video has no video track", code="CorruptVideo")


def _movie_duration(blocks: _Blocks, start: int, end: int) -> tuple[int, int]:
    """(timescale, duration) from ``mvhd``; a fragmented file's from ``mvex/mehd`` when mvhd has none."""
    mvhd = _child(blocks, start, end, "mvhd")
    if mvhd is None:
        raise ValueError("no 'mvhd' box")
    data = blocks.read(mvhd[0], 32)
    if data[0] == 1:
        timescale, duration = struct.unpack(">IQ", data[20:32])
    else:
        timescale, duration = struct.unpack(">II", data[12:20])
    if duration in (0, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF):
        duration = 0
        mvex = _child(blocks, start, end, "mvex")
        mehd = _child(blocks, *mvex, "mehd") if mvex else None
        if mehd is not None:
            data = blocks.read(mehd[0], 12)
            duration = struct.unpack(">Q", data[4:12])[0] if data[0] == 1 else struct.unpack(">I", data[4:8])[0]
    return timescale, duration


def _video_track(blocks: _Blocks, start: int, end: int) -> tuple[str | None, int | None, int | None] | None:
    """(codec, width, height) of a ``trak`` that is a video track, else None."""
    mdia = _child(blocks, start, end, "mdia")
    if mdia is None:
        return None
    hdlr = _child(blocks, *mdia, "hdlr")
    if hdlr is None or blocks.read(hdlr[0] + 8, 4) != b"vide":
        return None
    minf = _child(blocks, *mdia, "minf")
    stbl = _child(blocks, *minf, "stbl") if minf else None
    stsd = _child(blocks, *stbl, "stsd") if stbl else None
    if stsd is None:
        return None, None, None
    entry = blocks.read(stsd[0] + 8, 40)  # after version, flags and the entry count
    if len(entry) < 36:
        return None, None, None
    fourcc = entry[4:8].decode("latin-1")
    width, height = struct.unpack(">HH", entry[32:36])
    return _ISO_CODECS.get(fourcc, fourcc.strip() or None), width or None, height or None


# -- AVI (RIFF) --------------------------------------------------------------------------------------

_FOURCC_CODECS = {
    "H264": "h264",
    "X264": "h264",
    "AVC1": "h264",
    "HEVC": "hevc",
    "H265": "hevc",
    "XVID": "mpeg4",
    "DIVX": "mpeg4",
    "DX50": "mpeg4",
    "FMP4": "mpeg4",
    "MP4V": "mpeg4",
    "MJPG": "mjpeg",
    "VP80": "vp8",
    "VP90": "vp9",
}


def _riff_chunks(blocks: _Blocks, start: int, end: int) -> Iterator[tuple[str, int, int]]:
    """(id, data start, data end) of each RIFF chunk; a LIST's id is ``LIST:<type>``, its data after the type."""
    offset = start
    while offset + 8 <= end:
        chunk_id, size = struct.unpack("<4sI", blocks.read(offset, 8))
        name = chunk_id.decode("latin-1")
        data = offset + 8
        if name == "LIST":
            name = "LIST:" + blocks.read(data, 4).decode("latin-1")
            yield name, data + 4, min(data + size, end)
        else:
            yield name, data, min(data + size, end)
        offset = data + size + (size & 1)


def _probe_avi(blocks: _Blocks) -> VideoInfo:
    riff_size = struct.unpack("<I", blocks.read(4, 4))[0]
    end = min(8 + riff_size, blocks.size)
    hdrl = next(((s, e) for name, s, e in _riff_chunks(blocks, 12, end) if name == "LIST:hdrl"), None)
    if hdrl is None:
        raise ValueError("no 'hdrl' list")
    frame_us = frames = width = height = 0
    codec = None
    for name, start, stop in _riff_chunks(blocks, *hdrl):
        if name == "avih":
            values = struct.unpack("<10I", blocks.read(start, 40))
            frame_us, frames, width, height = values[0], values[4], values[8], values[9]
        elif name == "LIST:strl" and codec is None:
            codec = _avi_video_codec(blocks, start, stop)
    duration_ms = round(frame_us * frames / 1000) if frame_us and frames else None
    if codec is None:
        raise InvalidVideoError("the AVI has no video stream", code="CorruptVideo")
    return VideoInfo("avi", codec, duration_ms, width or None, height or None)


def _avi_video_codec(blocks: _Blocks, start: int, end: int) -> str | None:
    kind, codec = None, None
    for name, data, _ in _riff_chunks(blocks, start, end):
        if name == "strh":
            kind = blocks.read(data, 4)
            codec = blocks.read(data + 4, 4).decode("latin-1")
        elif name == "strf" and kind == b"vids":
            codec = blocks.read(data + 16, 4).decode("latin-1") or codec
    if kind != b"vids":
        return None
    return _FOURCC_CODECS.get((codec or "").upper(), (codec or "").strip() or "unknown")


# -- Matroska, WebM (EBML) ---------------------------------------------------------------------------

_SEGMENT, _INFO, _TRACKS, _CLUSTER = 0x18538067, 0x1549A966, 0x1654AE6B, 0x1F43B675
_MATROSKA_CODECS = {
    "V_MPEG4/ISO/AVC": "h264",
    "V_MPEGH/ISO/HEVC": "hevc",
    "V_VP8": "vp8",
    "V_VP9": "vp9",
    "V_AV1": "av1",
    "V_MJPEG": "mjpeg",
    "V_MPEG4/ISO/ASP": "mpeg4",
}


def _vint(blocks: _Blocks, offset: int, keep_marker: bool) -> tuple[int, int, bool]:
    """(value, length, unknown size) of the variable-length integer at ``offset``."""
    first = blocks.read(offset, 1)[0]
    length = 1
    while length <= 8 and not first & (0x80 >> (length - 1)):
        length += 1
    if length > 8:
        raise ValueError(f"a bad element at byte {offset}")
    value = int.from_bytes(blocks.read(offset, length), "big")
    unknown = not keep_marker and value == (1 << (7 * length)) - 1 | (1 << (7 * length))
    if not keep_marker:
        value &= (1 << (7 * length)) - 1
    return value, length, unknown


def _ebml_elements(blocks: _Blocks, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(id, data start, data end) of each element between ``start`` and ``end``."""
    offset = start
    while offset < end:
        element, id_length, _ = _vint(blocks, offset, keep_marker=True)
        size, size_length, unknown = _vint(blocks, offset + id_length, keep_marker=False)
        data = offset + id_length + size_length
        stop = end if unknown else min(data + size, end)
        yield element, data, stop
        offset = stop


def _probe_ebml(blocks: _Blocks) -> VideoInfo:
    doc_type, segment = "matroska", None
    for element, start, end in _ebml_elements(blocks, 0, blocks.size):
        if element == 0x1A45DFA3:
            for child, data, stop in _ebml_elements(blocks, start, end):
                if child == 0x4282:
                    doc_type = blocks.read(data, stop - data).decode("ascii", "replace")
        elif element == _SEGMENT:
            segment = (start, end)
            break
    if segment is None:
        raise InvalidVideoError("the Matroska file has no segment", code="CorruptVideo")
    scale, duration, track = 1_000_000, None, None
    for element, start, end in _ebml_elements(blocks, *segment):
        if element == _INFO:
            for child, data, stop in _ebml_elements(blocks, start, end):
                raw = blocks.read(data, stop - data)
                if child == 0x2AD7B1:
                    scale = int.from_bytes(raw, "big")
                elif child == 0x4489:
                    duration = struct.unpack(">f" if len(raw) == 4 else ">d", raw)[0]
        elif element == _TRACKS:
            track = _matroska_video_track(blocks, start, end)
        elif element == _CLUSTER or (duration is not None and track is not None):
            break
    if track is None:
        raise InvalidVideoError("the Matroska file has no video track", code="CorruptVideo")
    duration_ms = round(duration * scale / 1_000_000) if duration else None
    return VideoInfo("webm" if doc_type == "webm" else "matroska", track[0], duration_ms, track[1], track[2])


def _matroska_video_track(blocks: _Blocks, start: int, end: int):
    for element, entry_start, entry_end in _ebml_elements(blocks, start, end):
        if element != 0xAE:
            continue
        kind, codec, width, height = 0, "", None, None
        for child, data, stop in _ebml_elements(blocks, entry_start, entry_end):
            raw = blocks.read(data, stop - data)
            if child == 0x83:
                kind = int.from_bytes(raw, "big")
            elif child == 0x86:
                codec = raw.decode("ascii", "replace")
            elif child == 0xE0:
                for field, field_start, field_stop in _ebml_elements(blocks, data, stop):
                    value = int.from_bytes(blocks.read(field_start, field_stop - field_start), "big")
                    width = value if field == 0xB0 else width
                    height = value if field == 0xBA else height
        if kind == 1:
            return _MATROSKA_CODECS.get(codec, codec or None), width, height
    return None


# -- frames ------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Frame:
    """A decoded frame: its time from the video's start and its RGB pixels."""

    timestamp_ms: int
    pixels: np.ndarray


def _av():
    try:
        import av
    except ImportError as exc:
        raise MissingDependencyError(
            "decoding videos needs PyAV: pip install 'celebscan[local]' (or 'celebscan[video]')"
        ) from exc
    return av


#: The decoder's reads go through a buffer of this size (each refill one range request in S3).
READ_BUFFER_BYTES = 1024 * 1024


def sample_frames(
    ranges: ByteRanges, frames_per_second: float, start_ms: int = 0, max_side: int | None = None
) -> Iterator[Frame]:
    """Frames every ``1 / frames_per_second`` seconds from ``start_ms`` on (the first at or after
    it), decoded one at a time: memory holds one frame and the decoder's own buffers, whatever the
    video's length. ``max_side`` scales larger frames down (for detection) as they are converted.

    Raises :class:`InvalidVideoError` (``CorruptVideo``) when the decoder cannot open or read it.
    """
    av = _av()
    step_ms = 1000.0 / frames_per_second
    raw = io.BufferedReader(RangeFile(ranges), buffer_size=READ_BUFFER_BYTES)  # type: ignore[arg-type]
    try:
        container = av.open(raw, mode="r")
    except (av.FFmpegError, ValueError) as exc:
        raise InvalidVideoError(f"the video cannot be decoded: {exc}", code="CorruptVideo") from exc
    with container:
        if not container.streams.video:
            raise InvalidVideoError("the video has no video track", code="CorruptVideo")
        stream = container.streams.video[0]
        stream.thread_type = "NONE"  # one core: the recognizer takes the rest of the process's share
        if start_ms > 0 and stream.time_base:
            container.seek(int(start_ms / 1000 / stream.time_base), stream=stream, backward=True, any_frame=False)
        due = float(start_ms)
        try:
            for frame in container.decode(stream):
                if frame.pts is None or frame.time_base is None:
                    continue
                moment = float(frame.pts * frame.time_base) * 1000
                if moment + 0.5 < due:
                    continue
                yield Frame(round(moment), _rgb(frame, max_side))
                due = max(due + step_ms, moment + step_ms * 0.5)
        except av.FFmpegError as exc:
            message = f"the video cannot be decoded past {due / 1000:.1f} s: {exc}"
            raise InvalidVideoError(message, code="CorruptVideo") from exc


def _rgb(frame, max_side: int | None) -> np.ndarray:
    width, height = frame.width, frame.height
    if max_side and max(width, height) > max_side:
        scale = max_side / max(width, height)
        width, height = max(2, round(width * scale)), max(2, round(height * scale))
        return frame.reformat(width=width, height=height, format="rgb24").to_ndarray()
    return frame.to_ndarray(format="rgb24")
