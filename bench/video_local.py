"""The local recognizer on video: frames decoded and recognized per second on one core, the memory
of a one-hour video, and what the sampling rate costs and finds.

Videos made from faces-dev's pictures (scenes of 1 to 10 s, and frames of nobody between them),
640×360 at 10 frames/s, H.264 in MP4, encoded once and kept in a temporary folder:

1. decoding on one core: every frame, and one frame a second (what the default samples);
2. an embedded ``celebscan scan`` (one process, ``--workers 1``, one thread) of a one-hour
   video and of a one-minute one: frames recognized per second, video seconds per second, and the
   scan process's peak RSS; baseline: the one-minute video's peak, in the same run (bounded memory:
   the hour's peak within 10% of it);
3. the sampling rate: a video of 60 scenes of people lasting 1, 2 or 3 s (1.3 to 3.7 s of nobody
   between them), its frames sampled at 0.25 to 4 a second and recognized in this process on one core: the
   share of scenes in which a sampled frame shows their people, and the CPU per minute of video
   (the default, 1 a second, is the least rate that sees ≥ 95% of the 1-s scenes).

    python -m bench.video_local [--minutes 60] [--skip-hour]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

from tests.videomaker import letterboxed
from worker.media.images import LoadedImage
from worker.media.video import sample_frames
from worker.sources import FolderReader

FACES_DEV = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "faces-dev"
CACHE = Path(tempfile.gettempdir()) / "celebscan-bench-video"
SIZE, FPS = (640, 360), 10
#: Pictures whose people the gallery (train/) names, and who they are.
PEOPLE = {
    "test/obama1.jpg": {"obama"},
    "test/kit_with_rose.jpg": {"kit_harington", "rose_leslie"},
    "test/alex_lacamoire1.jpg": {"alex_lacamoire"},
    "test/obama_and_biden.jpg": {"obama", "biden"},
    "extra/obama3.jpg": {"obama"},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=int, default=60, help="the long video's length")
    parser.add_argument("--skip-hour", action="store_true", help="only decoding and the sampling rate")
    args = parser.parse_args()
    if not (FACES_DEV / "expected.csv").is_file():
        sys.exit(f"faces-dev is not at {FACES_DEV}")
    CACHE.mkdir(exist_ok=True)
    long_video = _video(CACHE / f"long-{args.minutes}m.mp4", args.minutes * 60, seed=1)
    short_video = _video(CACHE / "short-1m.mp4", 60, seed=2)
    met = _decoding(long_video)
    if not args.skip_hour:
        met &= _hour(long_video, short_video, args.minutes)
    met &= _sampling()
    print("OK" if met else "MISSED")
    return 0 if met else 1


def _decoding(video: Path) -> bool:
    ranges = FolderReader(10**12).ranges(str(video.parent), video.name)
    try:
        started = time.process_time()
        every = sum(1 for _ in sample_frames(ranges, FPS, max_side=None))
        all_cpu = time.process_time() - started
        started = time.process_time()
        sampled = sum(1 for _ in sample_frames(ranges, 1.0))
        sampled_cpu = time.process_time() - started
    finally:
        ranges.close()
    print(
        f"decoding on one core, {SIZE[0]}x{SIZE[1]} at {FPS} frames/s: every frame {every / all_cpu:,.0f} frames/s "
        f"({every:,} frames in {all_cpu:.1f} s of CPU); one frame a second: {sampled / sampled_cpu:,.0f} s of video "
        f"per s of CPU (every frame is decoded; only the sampled ones are converted)"
    )
    return True


def _hour(long_video: Path, short_video: Path, minutes: int) -> bool:
    short = _scan(short_video, {})
    long = _scan(long_video, {})
    seconds = minutes * 60
    print(
        f"an embedded scan at 1 frame/s, one process, one thread: {long['frames'] / long['cpu']:.1f} frames "
        f"decoded and recognized per s of CPU, {seconds / long['seconds']:.1f} s of video per s "
        f"({minutes} min of video in {long['seconds']:.0f} s, {long['cpu']:.0f} s of CPU, model loading included)"
    )
    ratio = long["peak_mb"] / short["peak_mb"]
    print(
        f"peak RSS of the scan process: {minutes}-minute video {long['peak_mb']:.0f} MB, 1-minute video (baseline) "
        f"{short['peak_mb']:.0f} MB: {ratio:.2f}x (target <= 1.10x)"
    )
    return ratio <= 1.10


def _sampling() -> bool:
    """Frames sampled at each rate and recognized here, on one core: which scenes' people are seen
    (in a frame of the scene), and the CPU per minute of video."""
    recognizer = _recognizer()
    rng = np.random.default_rng(3)
    scenes, pictures = [], sorted(PEOPLE)
    for number in range(60):
        gap = round(float(rng.uniform(1.3, 3.7)), 1)  # irregular: scenes fall anywhere against the sampling
        scenes += [(pictures[rng.integers(len(pictures))], [1.0, 2.0, 3.0][number % 3]), (None, gap)]
    video = _video(CACHE / "scenes.mp4", 0, scenes=scenes)
    minutes = sum(seconds for _, seconds in scenes) / 60
    print("sampling rate: share of scenes of 1 / 2 / 3 s whose people are seen; CPU per minute of video")
    least = None
    ranges = FolderReader(10**12).ranges(str(video.parent), video.name)
    try:
        for rate in (0.25, 0.5, 1.0, 2.0, 4.0):
            seen: list[tuple[float, set[str]]] = []
            started = time.process_time()
            for frame in sample_frames(ranges, rate, max_side=1920):  # OpenCV's networks run on one thread
                result = recognizer.recognize(LoadedImage(frame.pixels, "video frame", b""))
                seen.append((frame.timestamp_ms / 1000, {c.name for c in result.celebrities}))
            cpu = time.process_time() - started
            shares = _scenes_seen(scenes, seen)
            print(f"  {rate:g}/s: {' / '.join(f'{share:.0%}' for share in shares)}, {cpu / minutes:.1f} s of CPU")
            if least is None and shares[0] >= 0.95:
                least = rate
    finally:
        ranges.close()
    print(f"the least rate that sees >= 95% of the 1-s scenes: {least}/s (the default: 1/s)")
    return least is not None and least <= 1.0


def _scenes_seen(scenes, seen: list[tuple[float, set[str]]]) -> list[float]:
    """Of the scenes of 1, 2 and 3 s, the share in which a frame shows one of their people."""
    hits: dict[float, list[bool]] = {1.0: [], 2.0: [], 3.0: []}
    at = 0.0
    for picture, seconds in scenes:
        if picture is not None:
            names = PEOPLE[picture]
            hits[seconds].append(any(at <= moment < at + seconds and names & found for moment, found in seen))
        at += seconds
    return [sum(found) / len(found) for found in hits.values()]


def _recognizer():
    """The local recognizer with faces-dev's gallery (train/), in a database of its own."""
    from worker.database import connect
    from worker.faces.embeddings import FaceEmbedder
    from worker.faces.gallery import Gallery
    from worker.recognizers.local import LocalRecognizer

    engine = connect(f"sqlite:///{CACHE / 'gallery.db'}")
    embedder = FaceEmbedder()
    if not Gallery(engine).people():
        list(Gallery(engine).import_folder(FACES_DEV / "train", embedder))
    return LocalRecognizer(embedder, Gallery(engine).index())


def _scan(video: Path, env: dict[str, str]) -> dict:
    """An embedded scan of ``video`` alone (one process), timed, its peak RSS read while it runs."""
    with tempfile.TemporaryDirectory(prefix="celebscan-video-") as scratch:
        folder = Path(scratch) / "videos"
        folder.mkdir()
        os.link(video, folder / video.name)  # a symlink out of the folder would not be listed
        database = f"sqlite:///{scratch}/db.sqlite"
        child_env = {
            **os.environ,
            **env,
            "CELEBSCAN_DATABASE_URL": database,
            "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1",
        }
        celebscan = [sys.executable, "-m", "producer.cli"]
        subprocess.run(
            [*celebscan, "gallery", "import", str(FACES_DEV / "train")], env=child_env, check=True, capture_output=True
        )
        started, children = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
        process = subprocess.Popen(
            [*celebscan, "scan", str(folder), "--workers", "1"],
            env=child_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        peak = 0.0
        while process.poll() is None:
            peak = max(peak, _peak_rss_mb(process.pid))
            time.sleep(0.5)
        seconds = time.monotonic() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
        if process.returncode:
            sys.exit(f"the scan of {video} failed")
        results = subprocess.run([*celebscan, "results"], env=child_env, check=True, capture_output=True, text=True)
        record = json.loads(results.stdout.splitlines()[0])
    rate = float(env.get("CELEBSCAN_VIDEO_FRAMES_PER_SECOND", "1"))
    frames = (record.get("duration_seconds") or 0) * rate
    return {"seconds": seconds, "cpu": cpu, "peak_mb": peak, "record": record, "frames": frames}


def _peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _video(path: Path, seconds: float, seed: int = 0, scenes=None) -> Path:
    """A video of faces-dev's pictures and frames of nobody (cached at ``path``)."""
    if path.exists():
        return path
    import av

    if scenes is None:
        rng = np.random.default_rng(seed)
        pictures, scenes, total = sorted(PEOPLE), [], 0.0
        while total < seconds:
            length = float(rng.choice([1, 2, 3, 5, 10]))
            scenes += [(pictures[rng.integers(len(pictures))], length), (None, float(rng.choice([1, 5, 20])))]
            total += scenes[-2][1] + scenes[-1][1]
    frames = {picture: letterboxed(FACES_DEV / picture, SIZE) for picture in PEOPLE}
    nobody = np.full((SIZE[1], SIZE[0], 3), 30, dtype=np.uint8)
    partial = path.with_suffix(".partial.mp4")
    with av.open(str(partial), mode="w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = SIZE[0], SIZE[1], "yuv420p"
        stream.time_base = Fraction(1, FPS)
        stream.options = {"preset": "ultrafast", "crf": "30"}
        pts = 0
        for picture, length in scenes:
            pixels = nobody if picture is None else frames[picture]
            for _ in range(round(length * FPS)):
                frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
                frame.pts, pts = pts, pts + 1
                for packet in stream.encode(frame):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    partial.rename(path)
    return path


if __name__ == "__main__":
    sys.exit(main())
