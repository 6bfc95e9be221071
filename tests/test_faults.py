"""Nothing lost, nothing doubled: real workers, broker and database broken mid-scan.

Each test scans a bucket through Redis with real Celery worker processes into PostgreSQL, breaks
something part-way, and checks that every listed image ends with exactly one row (done or failed)
and no face row is doubled.
"""

import os
import signal
from collections import Counter
from dataclasses import dataclass

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from producer.cli import cli
from tests.celery_workers import (
    celery_workers,
    pid_with_port,
    pool_children,
    wait_for_scan,
)
from tests.imagemaker import jpeg
from tests.rekognition_standin import celebrity
from tests.servers import wait_until
from worker.schema import faces, images
from worker.settings import Settings
from worker.store import ResultStore

pytestmark = pytest.mark.slow

IMAGES = 40


@dataclass
class FaultScan:
    store: ResultStore
    env: dict
    source: str
    logs: object
    images: int = IMAGES

    def start(self) -> int:
        result = CliRunner().invoke(cli, ["scan", self.source], env=self.env, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return self.store.latest_scan_id()

    def processed(self, scan_id: int) -> int:
        return self.store.scan_summary(scan_id).processed

    def until_under_way(self, scan_id: int) -> None:
        """Wait until the workers have finished a few images: the moment to break something."""
        wait_until(lambda: self.processed(scan_id) >= 6, timeout=120, what="first images")

    def use(self, **env: str) -> None:
        self.env = {**self.env, **env}

    def check(self, scan_id: int, name: str) -> dict:
        """Print and assert: listed = done + failed, no duplicates."""
        summary = self.store.scan_summary(scan_id)
        with self.store.engine.connect() as conn:
            rows = conn.execute(select(func.count()).select_from(images)).scalar()
            keys = conn.execute(select(func.count(func.distinct(images.c.key)))).scalar()
            face_rows = conn.execute(select(func.count()).select_from(faces)).scalar()
            faced_images = conn.execute(select(func.count(func.distinct(faces.c.image_id)))).scalar()
        counts = summary.counts
        duplicates = (rows - keys) + (face_rows - faced_images)
        print(
            f"\n{name}: listed {summary.listed} / done {counts['done']} / failed {counts['failed']} / "
            f"queued {counts['queued']} / duplicated {duplicates}"
        )
        assert summary.listed == counts["done"] + counts["failed"] == self.images
        assert duplicates == 0 and face_rows == counts["done"]
        return counts


@pytest.fixture
def fault_scan(aws_env, rekognition, broker_url, postgres_url, s3, bucket, tmp_path):
    from tests.conftest import _reset_postgres, rekognition_scan_env

    _reset_postgres(postgres_url)
    for i in range(IMAGES):
        s3.put_object(Bucket=bucket, Key=f"f/{i:03d}.jpg", Body=jpeg(200 + i, 160))
    rekognition.answer = lambda key, data: {"CelebrityFaces": [celebrity("someone")]}
    rekognition.delay = 0.1
    env = rekognition_scan_env(
        aws_env,
        rekognition,
        broker_url,
        postgres_url,
        CELEBSCAN_VISIBILITY_TIMEOUT="5",
        CELEBSCAN_LEASE_SECONDS="4",  # a killed worker's images come free within seconds
        CELEBSCAN_MAX_ATTEMPTS="10",
        CELEBSCAN_CALLS_IN_FLIGHT="8",  # a batch's calls go together; a kill loses at most these
    )
    store = ResultStore.connect(postgres_url)
    yield FaultScan(store, env, f"s3://{bucket}/f/", tmp_path)
    store.engine.dispose()
    _reset_postgres(postgres_url)


@pytest.mark.parametrize("victim", ["pool process", "whole node"])
def test_a_worker_killed_mid_batch(fault_scan, victim, rekognition):
    """SIGKILL to a worker's pool process (redelivered at once) or to the whole node (after the
    visibility timeout), its calls in flight: every image done once; the calls the kill lost are
    paid again, and no more than a run keeps unwritten (a batch's outcomes are written when its
    last image is back)."""
    scan_id = fault_scan.start()
    with celery_workers(2, fault_scan.env, fault_scan.logs) as nodes:
        fault_scan.until_under_way(scan_id)
        callers = pool_children(nodes[0])
        for pid in callers + ([nodes[0].pid] if victim == "whole node" else []):
            os.kill(pid, signal.SIGKILL)
        wait_for_scan(fault_scan.store, scan_id, timeout=300)
    assert fault_scan.check(scan_id, f"{victim} SIGKILL")["failed"] == 0
    paid = Counter(call.digest for call in rekognition.calls if call.answered == "ok")
    # A run on the other node that the loaded machine stalled past its 4-s lease paid a call that
    # the run taking its images over paid again: its write was refused, and counted.
    refused = fault_scan.store.summary(scan_id).refused_writes
    # A run starts another batch while fewer than its lanes and a batch are unwritten (_Run._room):
    # a kill loses at most lanes + 2 batches - 1 outcomes.
    batch_size = int(fault_scan.env.get("CELEBSCAN_BATCH_SIZE", Settings().batch_size))
    unwritten = int(fault_scan.env["CELEBSCAN_CALLS_IN_FLIGHT"]) + 2 * batch_size - 1
    bound = IMAGES + len(callers) * unwritten + refused
    print(f"{sum(paid.values())} paid calls for {IMAGES} pictures (bound: {bound}, {refused} writes refused)")
    assert len(paid) == IMAGES and sum(paid.values()) <= bound
    assert max(paid.values()) <= 1 + len(callers) + refused


def test_warm_shutdown_mid_scan(fault_scan):
    scan_id = fault_scan.start()
    with celery_workers(2, fault_scan.env, fault_scan.logs) as nodes:
        fault_scan.until_under_way(scan_id)
        nodes[0].send_signal(signal.SIGTERM)
        nodes[0].wait(timeout=120)
        wait_for_scan(fault_scan.store, scan_id, timeout=300)
    assert fault_scan.check(scan_id, "warm shutdown (SIGTERM)")["failed"] == 0


def test_throttling_half_and_5xx_a_tenth_of_calls(fault_scan, rekognition):
    rekognition.throttle_every, rekognition.fail_every = 2, 5  # 5xx on calls 5, 15, 25...: a tenth
    rekognition.delay = 0
    scan_id = fault_scan.start()
    with celery_workers(2, fault_scan.env, fault_scan.logs):
        wait_for_scan(fault_scan.store, scan_id, timeout=300)
    assert fault_scan.check(scan_id, "throttle 50% + 5xx 10%")["failed"] == 0
    answered = [c.answered for c in rekognition.calls]
    assert answered.count("ThrottlingException") >= IMAGES // 2 and answered.count("InternalServerError") >= 4


def test_a_poison_image_is_quarantined(fault_scan, rekognition):
    """The image f/007.jpg kills whichever worker process works on it, every time."""
    nodes = []

    def answer(key, data):
        if key == "f/007.jpg":
            children = [pid for node in nodes for pid in pool_children(node)]
            caller = pid_with_port(rekognition.request.client_port, children)
            assert caller is not None, "the stand-in could not find the calling worker process"
            os.kill(caller, signal.SIGKILL)
        return {"CelebrityFaces": [celebrity("someone")]}

    rekognition.answer = answer
    scan_id = fault_scan.start()
    with celery_workers(2, fault_scan.env, fault_scan.logs) as started:
        nodes.extend(started)
        wait_for_scan(fault_scan.store, scan_id, timeout=300)
    counts = fault_scan.check(scan_id, "poison image")
    records = {r.key: r for r in fault_scan.store.result_records(scan_id)}
    assert counts["failed"] == 1 and records["f/007.jpg"].error.code == "Quarantined"


@pytest.fixture
def own_server(request):
    """A server of the test's own that it may stop and start: ``own_server(ServerClass, **options)``."""
    from tests.servers import ServerUnavailable

    started = []

    def make(server_class, **options):
        try:
            server = server_class(**options)
        except ServerUnavailable as exc:
            from tests.conftest import unavailable

            unavailable(str(exc))
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.close()


def own_broker(fault_scan, own_server, appendonly: bool):
    """A Redis of the test's own, that the scan's producer and workers use."""
    from tests.servers import RedisServer

    broker = own_server(RedisServer, appendonly=appendonly)
    fault_scan.use(CELERY_BROKER_URL=broker.url)
    return broker


def test_redis_restarted_mid_scan_with_its_append_only_file(fault_scan, own_server):
    broker = own_broker(fault_scan, own_server, appendonly=True)
    scan_id = fault_scan.start()
    with celery_workers(2, fault_scan.env, fault_scan.logs):
        fault_scan.until_under_way(scan_id)
        broker.stop()
        broker.start()
        wait_for_scan(fault_scan.store, scan_id, timeout=300)
    assert fault_scan.check(scan_id, "Redis restarted (AOF)")["failed"] == 0


def test_broker_data_lost_mid_scan_is_recovered_by_resume(fault_scan, own_server, rekognition):
    broker = own_broker(fault_scan, own_server, appendonly=False)
    scan_id = fault_scan.start()
    with celery_workers(2, fault_scan.env, fault_scan.logs):
        fault_scan.until_under_way(scan_id)
        broker.stop()
        finished_before = {r.key for r in fault_scan.store.result_records(scan_id) if r.status == "done"}
        broker.start()
        resumed = CliRunner().invoke(
            cli, ["scan", "--resume", str(scan_id)], env=fault_scan.env, catch_exceptions=False
        )
        assert resumed.exit_code == 0 and "resuming" in resumed.output, resumed.output
        wait_for_scan(fault_scan.store, scan_id, timeout=300)
    assert fault_scan.check(scan_id, "Redis lost its data; scan --resume")["failed"] == 0
    calls = [c.key for c in rekognition.calls if c.answered == "ok"]
    assert all(calls.count(key) == 1 for key in finished_before), "finished images must not be billed again"


def test_postgres_stopped_for_30_seconds_mid_scan(fault_scan, own_server):
    import time

    from sqlalchemy import create_engine

    from tests.servers import PostgresServer

    database = own_server(PostgresServer)
    fault_scan.use(CELEBSCAN_DATABASE_URL=database.url)
    fault_scan.store = ResultStore(create_engine(database.url, pool_pre_ping=True))
    scan_id = fault_scan.start()
    with celery_workers(2, fault_scan.env, fault_scan.logs):
        fault_scan.until_under_way(scan_id)
        database.stop()
        time.sleep(30)  # the fault itself: the database is away for 30 s
        database.start()
        wait_for_scan(fault_scan.store, scan_id, timeout=600)
    assert fault_scan.check(scan_id, "PostgreSQL down 30 s")["failed"] == 0


def test_transient_errors_never_fail_an_image_through_a_worker_kill_and_a_redis_restart(
    fault_scan, own_server, rekognition, s3, bucket
):
    """600 images; 30% throttling and 5% 500s, few enough tries in a row that many images outlast
    them; a pool process SIGKILLed and Redis restarted mid-scan: every image done, once."""
    fault_scan.images = 600
    for i in range(IMAGES, fault_scan.images):
        s3.put_object(Bucket=bucket, Key=f"f/{i:03d}.jpg", Body=jpeg(200 + i % 300, 160))
    rekognition.throttle_share, rekognition.fail_share, rekognition.delay = 0.30, 0.05, 0
    fault_scan.use(CELEBSCAN_MAX_ATTEMPTS="3", CELEBSCAN_BATCH_SIZE="16")
    broker = own_broker(fault_scan, own_server, appendonly=True)
    scan_id = fault_scan.start()
    with celery_workers(2, fault_scan.env, fault_scan.logs) as nodes:
        fault_scan.until_under_way(scan_id)
        for pid in pool_children(nodes[0]):
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: fault_scan.processed(scan_id) >= 250, timeout=300, what="250 images")
        broker.stop()
        broker.start()
        wait_for_scan(fault_scan.store, scan_id, timeout=900)
    counts = fault_scan.check(scan_id, "throttle 30% + 5xx 5%, worker SIGKILL, Redis restart")
    assert counts["failed"] == 0
    with fault_scan.store.engine.connect() as conn:
        outlasted = conn.execute(select(func.count()).where(images.c.retries >= 3)).scalar()
    print(f"images that outlasted the tries in a row and were handed out again: {outlasted}")
    assert outlasted > 0, "the test must make images outlast the in-process retries"


def test_throttling_that_never_ends_fails_every_image_after_the_deadline(fault_scan, rekognition):
    rekognition.throttle_every, rekognition.delay = 1, 0
    fault_scan.use(CELEBSCAN_MAX_ATTEMPTS="2", CELEBSCAN_RETRY_DEADLINE="6")
    scan_id = fault_scan.start()
    with celery_workers(2, fault_scan.env, fault_scan.logs):
        wait_for_scan(fault_scan.store, scan_id, timeout=600)
    counts = fault_scan.check(scan_id, "throttled for ever, 6 s deadline")
    assert counts["failed"] == IMAGES
    errors = [r.error for r in fault_scan.store.result_records(scan_id)]
    assert {e.code for e in errors} == {"ThrottlingException"}
    assert all(e.message.startswith("gave up after ") and " tries over " in e.message for e in errors)
    assert all(int(e.message.split()[3]) >= 4 for e in errors), "handed out again before giving up"
