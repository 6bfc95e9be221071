"""Videos without a recognizer: headers read without decoding (also by S3 range requests), frames
sampled, Rekognition Video's limits, and detections merged into appearances."""

from __future__ import annotations

import pytest

from tests.videomaker import KINDS, clip, colour, mp4_header
from worker.errors import InvalidVideoError, VideoOverLimitsError
from worker.media.video import BytesRanges, media_of, probe, sample_frames
from worker.recognition import BoundingBox
from worker.recognizers.rekognition_video import check_limits, request_token
from worker.videos.appearances import Merger

SCENES = [(colour((200, 40, 40)), 2.0), (colour((40, 40, 200)), 1.0)]
EXPECTED = {
    "mp4": ("mp4", "h264"),
    "mov": ("mov", "h264"),
    "avi": ("avi", "h264"),
    "mkv": ("matroska", "h264"),
    "webm": ("webm", "vp9"),
    "mp4-mpeg4": ("mp4", "mpeg4"),
    "mp4-hevc": ("mp4", "hevc"),
}


class CountingRanges(BytesRanges):
    """Bytes read a range at a time, counting what was read."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.read_bytes = self.requests = 0

    def read(self, start: int, length: int) -> bytes:
        data = super().read(start, length)
        self.read_bytes += len(data)
        self.requests += 1
        return data


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_header_says_format_codec_length_and_size(kind):
    info = probe(BytesRanges(clip(SCENES, kind=kind, size=(320, 240))))
    assert (info.format, info.codec) == EXPECTED[kind]
    assert (info.width, info.height) == (320, 240)
    assert abs(info.duration_ms - 3000) <= 200, info


def test_a_header_at_the_end_of_a_big_file_is_read_in_a_few_ranges():
    """An MP4 written without faststart keeps its moov box after 50 MB of media: reading its header
    takes a handful of small reads, never the media."""
    data = mp4_header(95.5, media_bytes=50_000_000, header_last=True)
    ranges = CountingRanges(data)
    info = probe(ranges)
    assert (info.format, info.codec, info.duration_ms, info.width) == ("mp4", "h264", 95_500, 1280)
    assert ranges.read_bytes < 300_000 and ranges.requests <= 4, (ranges.read_bytes, ranges.requests)


@pytest.mark.parametrize(
    "data, code",
    [
        (b"", "EmptyObject"),
        (b"<html><body>Not Found</body></html>", "InvalidVideoFormat"),
        (mp4_header(10, media_bytes=1000, header_last=True)[:-40], "CorruptVideo"),
        (mp4_header(10, media_bytes=1000, header_last=True)[:500], "CorruptVideo"),
    ],
    ids=["empty", "html", "header cut off", "media cut off"],
)
def test_what_is_not_a_readable_video_fails_with_a_code(data, code):
    with pytest.raises(InvalidVideoError) as raised:
        probe(BytesRanges(data))
    assert raised.value.code == code


@pytest.mark.parametrize(
    "header, size, in_s3, code",
    [
        (mp4_header(7 * 3600), 10**6, True, "VideoTooLong"),
        (mp4_header(60, fourcc=b"hvc1"), 10**6, True, "UnsupportedVideoCodec"),
        (None, 10**6, True, "UnsupportedVideoFormat"),
        (mp4_header(60), 11 * 1024**3, True, "VideoTooLarge"),
        (mp4_header(60), 10**6, False, "VideoNotInS3"),
        (mp4_header(6 * 3600, brand=b"qt  "), 10**6, True, None),
    ],
    ids=["7 hours", "HEVC", "Matroska", "11 GB", "a folder", "a 6-hour MOV is within"],
)
def test_rekognition_video_limits_are_known_before_any_call(header, size, in_s3, code):
    info = probe(BytesRanges(header if header is not None else clip(SCENES, kind="mkv")))
    if code is None:
        check_limits(info, size, in_s3)
        return
    with pytest.raises(VideoOverLimitsError) as raised:
        check_limits(info, size, in_s3)
    assert raised.value.code == code


def test_frames_are_sampled_evenly_and_a_later_run_resumes_from_a_moment():
    data = clip(SCENES, fps=10)
    every_half_second = [frame.timestamp_ms for frame in sample_frames(BytesRanges(data), 2.0)]
    assert every_half_second == [0, 500, 1000, 1500, 2000, 2500]
    resumed = [frame.timestamp_ms for frame in sample_frames(BytesRanges(data), 2.0, start_ms=1500)]
    assert resumed == [1500, 2000, 2500]
    first = next(iter(sample_frames(BytesRanges(data), 1.0)))
    assert first.pixels.shape == (240, 320, 3) and tuple(first.pixels[120, 160]) == pytest.approx((200, 40, 40), abs=12)


def test_a_video_cut_off_mid_stream_fails_to_decode_with_a_code():
    data = clip(SCENES, kind="mkv")  # Matroska streams: a cut file opens, then stops
    with pytest.raises(InvalidVideoError) as raised:
        list(sample_frames(BytesRanges(data[:200]), 1.0))
    assert raised.value.code == "CorruptVideo"


def test_detections_merge_into_ranges_with_the_best_frame():
    box = BoundingBox(0.1, 0.1, 0.2, 0.2)
    best = BoundingBox(0.5, 0.5, 0.1, 0.1)
    merger = Merger(gap_ms=1000)
    for moment, confidence in [(0, 90), (500, 91), (1400, 95), (5000, 80), (2300, 92)]:
        merger.add(moment, "obama", "o1", confidence, best if confidence == 95 else box)
    merger.add(3000, "biden", None, 99.0, box)
    resumed = Merger(gap_ms=1000, state=merger.state())  # a later run carries it on
    resumed.add(5800, "obama", "o1", 85, box)
    obama, biden = resumed.appearances()
    assert obama.ranges == ((0, 2300), (5000, 5800)) and obama.detections == 6
    assert (obama.match_confidence, obama.frame_ms, obama.box) == (95, 1400, best)
    assert (biden.name, biden.person_id, biden.ranges) == ("biden", None, ((3000, 3000),))


def test_a_gap_between_two_ranges_closed_later_joins_them():
    merger = Merger(gap_ms=1600)
    for moment in (0, 3000, 1500):
        merger.add(moment, "kit", "k", 90, BoundingBox(0, 0, 1, 1))
    [kit] = merger.appearances()
    assert kit.ranges == ((0, 3000),)


def test_videos_are_named_by_extension_and_the_start_token_by_identity():
    assert [media_of(key) for key in ("a.MP4", "b.mov", "c.jpg", "d.webm", "e.txt")] == [
        "video",
        "video",
        None,
        "video",
        None,
    ]
    token = request_token("etag-1", 10, "bucket", "a.mp4", 0)
    assert token == request_token("etag-1", 10, "bucket", "a.mp4", 0) and len(token) <= 64
    assert token != request_token("etag-1", 10, "bucket", "a.mp4", 1)
