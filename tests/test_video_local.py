"""Videos scanned with the local recognizer: sampled frames through YuNet and SFace, in slices
across runs, appearances stored, counted, listed, exported and drawn; the same bytes worked once."""

from __future__ import annotations

import csv
import io
import json

import pytest
from sqlalchemy import select

from tests.clirun import celebscan
from tests.videomaker import clip, colour
from worker.queue.videos import VideoJobs
from worker.schema import video_jobs
from worker.store import ResultStore

pytestmark = pytest.mark.slow

VIDEO_ENV = {"CELEBSCAN_VIDEO_FRAMES_PER_SECOND": "4", "CELEBSCAN_VIDEO_SLICE_SECONDS": "0.2"}


@pytest.fixture(scope="module")
def story(faces_dev) -> bytes:
    """Obama for 2 s, nobody for 1 s, Kit Harington with Rose Leslie for 2 s."""
    test = faces_dev / "test"
    scenes = [(test / "obama1.jpg", 2.0), (colour((30, 30, 200)), 1.0), (test / "kit_with_rose.jpg", 2.0)]
    return clip(scenes, size=(480, 360))


def records(database: str, *extra: str) -> dict[str, dict]:
    lines = celebscan("--database-url", database, "results", *extra).output.splitlines()
    return {record["key"]: record for record in map(json.loads, lines)}


def seen(record: dict) -> dict[str, list[tuple[float, float]]]:
    return {a["name"]: [(r["start"], r["end"]) for r in a["ranges"]] for a in record["appearances"]}


def test_a_folder_of_pictures_and_videos(faces_dev, story, tmp_path, sqlite_url, monkeypatch):
    folder = tmp_path / "media"
    folder.mkdir()
    (folder / "story.mp4").write_bytes(story)
    (folder / "copy of story.mov").write_bytes(story)  # the same bytes under another name: worked once
    (folder / "broken.mp4").write_bytes(story[: len(story) // 2])
    (folder / "notes.webm").write_bytes(b"not a video")
    (folder / "obama1.jpg").write_bytes((faces_dev / "test" / "obama1.jpg").read_bytes())
    test = faces_dev / "test"
    (folder / "reversed.mkv").write_bytes(
        clip([(test / "kit_with_rose.jpg", 2.0), (test / "obama1.jpg", 2.0)], kind="mkv")
    )
    for name, value in VIDEO_ENV.items():
        monkeypatch.setenv(name, value)
    slices = []
    save = VideoJobs.save_progress
    monkeypatch.setattr(VideoJobs, "save_progress", lambda self, *a: slices.append((a[2].id, a[3])) or save(self, *a))

    celebscan("--database-url", sqlite_url, "gallery", "import", faces_dev / "train")
    output = celebscan("--database-url", sqlite_url, "scan", folder, "--workers", "1").output
    assert "of which videos: 0 queued, 3 done, 2 failed" in output, output
    assert "obama (1 image, 3 videos)" in output and "rose_leslie (3 videos)" in output, output

    found = records(sqlite_url)
    story_seen = seen(found["story.mp4"])
    assert set(story_seen) == {"obama", "kit_harington", "rose_leslie"}
    [(start, end)] = story_seen["obama"]
    assert start == 0 and 1.0 <= end < 2.0
    for name in ("kit_harington", "rose_leslie"):
        [(start, end)] = story_seen[name]
        assert 3.0 <= start < 3.5 and 4.0 <= end < 5.0, (name, start, end)
    assert found["story.mp4"]["duration_seconds"] == 5.0 and found["story.mp4"]["media"] == "video"
    assert found["copy of story.mov"]["appearances"] == found["story.mp4"]["appearances"]
    assert seen(found["reversed.mkv"])["obama"][0][0] >= 2.0
    assert found["broken.mp4"]["error"]["code"] == "CorruptVideo"
    assert found["notes.webm"]["error"]["code"] == "InvalidVideoFormat"
    assert "media" not in found["obama1.jpg"], "an image's record keeps its shape"
    obama = next(a for a in found["story.mp4"]["appearances"] if a["name"] == "obama")
    assert obama["match_confidence"] > 50 and obama["frame"]["timestamp"] <= 2.0 and obama["detections"] >= 4

    store = ResultStore.connect(sqlite_url)
    with store.engine.connect() as conn:
        jobs = conn.execute(select(video_jobs.c.key, video_jobs.c.status, video_jobs.c.position_ms)).all()
    assert sorted((key, status) for key, status, _ in jobs) == [
        ("copy of story.mov", "succeeded"),  # the first of the two copies listed
        ("reversed.mkv", "succeeded"),
    ], "two copies of one video are worked once"
    assert len(slices) >= 2, "a video is worked in slices"
    for job in {job for job, _ in slices}:
        positions = [position for each, position in slices if each == job]
        assert positions == sorted(set(positions)), "a video is worked in slices, each from where the last stopped"

    people = [
        json.loads(line)
        for line in celebscan("--database-url", sqlite_url, "people", "--format", "jsonl").output.splitlines()
    ]
    assert {p["name"]: (p["images"], p["videos"]) for p in people} == {
        "obama": (1, 3),
        "kit_harington": (0, 3),
        "rose_leslie": (0, 3),
    }
    assert set(records(sqlite_url, "--person", "rose_leslie")) == {"story.mp4", "copy of story.mov", "reversed.mkv"}
    rows = list(
        csv.DictReader(io.StringIO(celebscan("--database-url", sqlite_url, "results", "--format", "csv").output))
    )
    story_row = next(row for row in rows if row["key"] == "story.mp4")
    assert story_row["media"] == "video" and json.loads(story_row["appearances"])[0]["name"] == "obama"
    report = tmp_path / "report.html"
    celebscan("--database-url", sqlite_url, "report", "--output", report)
    page = report.read_text()
    assert page.count("<svg class=timeline") == 3 and "obama: 0.0–" in page

    shown = celebscan("--database-url", sqlite_url, "show", "story.mp4", "--output", tmp_path / "story.jpg").output
    assert "obama" in shown and (tmp_path / "story.jpg").stat().st_size > 1000, shown

    again = celebscan("--database-url", sqlite_url, "scan", folder, "--workers", "1").output
    assert "4 already done" in again, again


def test_a_video_in_s3_is_read_by_ranges(faces_dev, story, s3, bucket, sqlite_url, monkeypatch):
    s3.put_object(Bucket=bucket, Key="clips/story.mp4", Body=story)
    for name, value in VIDEO_ENV.items():
        monkeypatch.setenv(name, value)
    celebscan("--database-url", sqlite_url, "gallery", "import", faces_dev / "train")
    celebscan("--database-url", sqlite_url, "scan", f"s3://{bucket}/clips/", "--backend", "local", "--workers", "1")
    record = records(sqlite_url)["clips/story.mp4"]
    assert set(seen(record)) == {"obama", "kit_harington", "rose_leslie"}
