"""The embedded scan's process pool (producer/local_pool.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from sqlalchemy import func, select

from producer.local_pool import _pool, drain_scan
from tests.imagemaker import jpeg
from worker.listing import ListedObject, list_folder
from worker.queue.images import ImageQueue
from worker.schema import images
from worker.settings import Settings
from worker.store import ResultStore


def test_each_pool_takes_the_environment_of_the_moment_it_starts(tmp_path, monkeypatch):
    """The pool's processes fork from a fork server that lives as long as this process: a second
    scan here (a notebook, the tests) with other AWS endpoints must not call the first one's."""
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'results.db'}", backend="rekognition")
    seen = []
    for endpoint in ("http://127.0.0.1:1", "http://127.0.0.1:2"):
        monkeypatch.setenv("AWS_ENDPOINT_URL_REKOGNITION", endpoint)
        with _pool(settings, 2) as pool:
            seen.append({pool.submit(os.getenv, "AWS_ENDPOINT_URL_REKOGNITION").result() for _ in range(4)})
    assert seen == [{"http://127.0.0.1:1"}, {"http://127.0.0.1:2"}]


def test_processes_sharing_a_scan_split_its_last_images_and_one_alone_takes_whole_batches(store):
    """Guided self-scheduling: two processes draining 40 images in batches of 16 end within an image
    of each other rather than one working a last whole batch alone."""
    sizes = {}
    for sharers in (1, 2):
        scan_id = store.create_scan(f"/photos-{sharers}", "local")
        listed = [ListedObject(f"{number}.jpg", f"etag-{number}", 100) for number in range(40)]
        store.queue_images(scan_id, f"/photos-{sharers}", "local", listed)
        images = ImageQueue(store.engine, lease_seconds=60)
        sizes[sharers] = []
        while claimed := images.claim(scan_id, 16, f"run-{sharers}-{len(sizes[sharers])}", sharers):
            sizes[sharers].append(len(claimed))
    assert sizes[1] == [16, 16, 8]
    shared = sizes[2]
    assert sum(shared) == 40 and shared == sorted(shared, reverse=True), shared
    assert shared[0] < 16 and shared[-1] == 1, "fewer than two batches each were left: the claims shrink to one image"


def test_a_pool_scan_is_drained_by_this_process_too(tmp_path):
    """``--workers 2`` is this process and one pool process: this one starts on the images while the
    pool's process starts (its imports and models), and every image is done once."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for number in range(12):
        (folder / f"{number:02d}.jpg").write_bytes(jpeg(200 + number, 120))  # 12 pictures, no copies
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'results.db'}", backend="local")
    store = ResultStore.from_settings(settings)
    scan_id = store.create_scan(str(folder), "local")
    store.queue_images(scan_id, str(folder), "local", list_folder(folder))

    report = drain_scan(settings, scan_id, workers=2)

    assert report.done == 12 and store.summary(scan_id).counts["done"] == 12
    with store.engine.connect() as conn:
        tokens = conn.execute(select(images.c.started_by).where(images.c.scan_id == scan_id)).scalars().all()
    assert any(token.startswith(f"embedded:{os.getpid()}:") for token in tokens), tokens


@pytest.mark.slow
def test_a_killed_embedded_scan_stops_its_pool_and_gives_its_images_back(tmp_path):
    """``kill PID`` (SIGTERM to the command alone, as systemd or a shell's ``kill`` sends it) ends
    an embedded scan as Ctrl-C does: the pool's processes stop after the batch in hand, nothing of
    the command's is left running, and no image stays claimed (``--resume`` takes them at once)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for number in range(300):
        (folder / f"{number:03d}.jpg").write_bytes(jpeg(640 + number, 480))
    database = f"sqlite:///{tmp_path / 'results.db'}"
    command = [sys.executable, "-m", "producer.cli", "--database-url", database, "scan", str(folder), "--workers", "2"]
    scan = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    store = ResultStore.connect(database)
    try:
        deadline = time.monotonic() + 120
        while _done(store) < 20:  # under way in both processes' first batches
            assert scan.poll() is None and time.monotonic() < deadline, "the scan ended or never started"
            time.sleep(0.05)
        scan.send_signal(signal.SIGTERM)
        assert scan.wait(timeout=60) != 0
        deadline = time.monotonic() + 60
        while _group_alive(scan.pid):  # the fork server and the pool's process go with the command
            assert time.monotonic() < deadline, "processes of the killed scan are still running"
            time.sleep(0.05)
        with store.engine.connect() as conn:
            statuses = Counter(
                (status, holder is not None)
                for status, holder in conn.execute(select(images.c.status, images.c.claimed_by)).all()
            )
        assert statuses[("queued", False)] > 0 and statuses[("queued", True)] == 0, statuses
    finally:
        if scan.poll() is None:
            os.killpg(scan.pid, signal.SIGKILL)
        store.engine.dispose()


def _done(store: ResultStore) -> int:
    with store.engine.connect() as conn:
        return conn.execute(select(func.count()).where(images.c.status == "done")).scalar_one()


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True
