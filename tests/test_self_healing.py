"""No scan waits for a human: the three stalls issue 27 found, on real Celery nodes, Redis and
PostgreSQL, with the Rekognition stand-in. Nobody runs ``scan --resume`` here.

1. Runs killed by their hard time limit (calls slower than the limits) lose no window slot, and
   the slow images are not quarantined: once calls are fast again, the scan finishes by itself.
2. A node SIGKILLed while it holds window slots: a fresh node finishes the scan within about a
   lease, and ``status`` says the window is being repaired meanwhile.
3. A plain scan leaves a live ``--force`` scan's queued images to it.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

import pytest
from click.testing import CliRunner

from producer.cli import cli
from tests.celery_workers import celery_workers, wait_for_scan
from tests.imagemaker import jpeg
from tests.rekognition_standin import celebrity
from tests.servers import wait_until
from worker.queue.slots import WindowSlots
from worker.store import ResultStore

pytestmark = pytest.mark.slow


@pytest.fixture
def healing(aws_env, rekognition, broker_url, postgres_url, s3, bucket, tmp_path):
    from tests.conftest import _reset_postgres, rekognition_scan_env

    _reset_postgres(postgres_url)
    rekognition.answer = lambda key, data: {"CelebrityFaces": [celebrity(f"person {key[-7:-4]}")]}
    env = rekognition_scan_env(aws_env, rekognition, broker_url, postgres_url)
    store = ResultStore.connect(postgres_url)

    class Healing:
        def __init__(self) -> None:
            self.store, self.env, self.logs, self.s3, self.bucket = store, env, tmp_path, s3, bucket
            self.standin = rekognition

        def put(self, count: int, prefix: str = "p/") -> str:
            for number in range(count):
                self.s3.put_object(Bucket=bucket, Key=f"{prefix}{number:03d}.jpg", Body=jpeg(200 + number, 160))
            return f"s3://{bucket}/{prefix}"

        def scan(self, *arguments: str, **env: str) -> int:
            result = CliRunner().invoke(cli, ["scan", *arguments], env={**self.env, **env}, catch_exceptions=False)
            assert result.exit_code == 0, result.output
            return self.store.latest_scan_id()

        def status(self, scan_id: int) -> str:
            result = CliRunner().invoke(cli, ["status", str(scan_id)], env=self.env, catch_exceptions=False)
            return result.output

        def window(self, scan_id: int):
            return WindowSlots(self.store.engine, float(self.env.get("CELEBSCAN_LEASE_SECONDS", 120))).states(
                [scan_id]
            )[scan_id]

    yield Healing()
    store.engine.dispose()
    _reset_postgres(postgres_url)


def test_hard_time_limits_eat_no_slot_and_slow_images_are_not_quarantined(healing):
    """Finding 1, scaled down as the issue measured it: visibility timeout 20 s (time limits at 15
    and 18 s), window 4, lease 30 s, calls of 25 s."""
    healing.env.update(
        CELEBSCAN_VISIBILITY_TIMEOUT="20",
        CELEBSCAN_WINDOW="4",
        CELEBSCAN_LEASE_SECONDS="30",
        CELEBSCAN_CALLS_IN_FLIGHT="4",
    )
    source = healing.put(24)
    healing.standin.delay = 25.0
    with celery_workers(1, healing.env, healing.logs, concurrency=2):
        scan_id = healing.scan(source)
        log = healing.logs / "worker0.log"
        wait_until(lambda: log.read_text().count("Hard time limit") >= 4, timeout=180, what="four runs killed")
        window = healing.window(scan_id)
        assert window.size == 4 and window.ended == 0, "every slot is still there"
        healing.standin.delay = 0.1
        fast_again = time.monotonic()
        wait_for_scan(healing.store, scan_id, timeout=240)
        print(f"\nfinished {time.monotonic() - fast_again:.0f} s after calls were fast again; {window}")
    summary = healing.store.summary(scan_id)
    assert summary.counts["done"] == 24 and summary.counts["failed"] == 0, summary.failures
    assert healing.window(scan_id).repairs == 0, "a requeued message took its slot back: nothing to repair"


def test_a_node_killed_with_the_window_in_hand_is_taken_over_within_a_lease(healing):
    """Finding 2: the broker's visibility timeout is an hour; the window's keeper on the fresh node
    sends the dead node's slots again once their lease ran out."""
    healing.env.update(CELEBSCAN_WINDOW="4", CELEBSCAN_LEASE_SECONDS="10", CELEBSCAN_CALLS_IN_FLIGHT="2")
    source = healing.put(40)
    healing.standin.delay = 1.0
    with celery_workers(1, healing.env, healing.logs, concurrency=2, name="doomed") as [doomed]:
        scan_id = healing.scan(source)
        wait_until(lambda: healing.window(scan_id).running >= 2, timeout=60, what="the node running slots")
        os.killpg(doomed.pid, signal.SIGKILL)
        killed = time.monotonic()
    with celery_workers(1, healing.env, healing.logs, concurrency=2, name="fresh"):
        wait_until(
            lambda: "sent again" in healing.status(scan_id) or "repairing" in healing.status(scan_id),
            timeout=60,
            what="status to say the window is repaired",
        )
        wait_for_scan(healing.store, scan_id, timeout=180)
        took = time.monotonic() - killed
    summary = healing.store.summary(scan_id)
    print(f"\nscan finished {took:.0f} s after the node was killed; window {healing.window(scan_id)}")
    assert summary.counts["done"] == 40 and healing.window(scan_id).repairs >= 1
    assert took < 120, "within about a lease of the kill, not the broker's visibility timeout"


def test_a_plain_scan_leaves_a_live_forced_scans_images_to_it(healing):
    """Finding 3: while a --force scan's workers are alive, a plain scan of the same source takes
    none of its queued images; each picture is paid once by the first scan and once by --force."""
    healing.env.update(CELEBSCAN_WINDOW="2", CELEBSCAN_CALLS_IN_FLIGHT="1")
    source = healing.put(30)
    with celery_workers(1, healing.env, healing.logs, concurrency=2):
        first = healing.scan(source)
        wait_for_scan(healing.store, first)
        healing.standin.delay = 0.5
        forced = healing.scan(source, "--force")
        wait_until(lambda: healing.store.summary(forced).counts["done"] >= 2, timeout=60, what="the forced scan going")
        plain = healing.scan(source)
        assert healing.store.summary(forced).handed_over == 0, "nothing taken from the live forced scan"
        left = healing.store.summary(plain).held_elsewhere
        healing.standin.delay = 0.0
        for scan_id in (forced, plain):
            wait_for_scan(healing.store, scan_id)
    forced_summary = healing.store.summary(forced)
    assert forced_summary.counts["done"] == 30 and forced_summary.handed_over == 0
    assert left + healing.store.summary(plain).skipped == 30
    paid = Counter(call.key for call in healing.standin.calls if call.answered == "ok")
    assert set(paid.values()) == {2}, "once by the first scan, once by --force"
