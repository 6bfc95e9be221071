"""Two worker hosts and one services host on this machine (network namespaces), one host cut off.

The services (PostgreSQL, Redis, moto's S3, the Rekognition stand-in) listen only on the services
host's bridge address; each worker host runs a Celery worker node that reaches them over its one
veth link. Mid-scan one host's link is cut and its workers killed, as when an instance vanishes:
its unacknowledged batches come back after the visibility timeout and the other host finishes.
(kombu looks for expired batches about every 100 s, so the test takes about two minutes.)
"""

import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from urllib.parse import urlsplit

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from producer.cli import cli
from tests.celery_workers import celery_workers, pool_children, wait_for_scan
from tests.conftest import unavailable
from tests.imagemaker import jpeg
from tests.netns import network
from tests.servers import ServerUnavailable, wait_until
from tests.stack import fill_bucket, start_stack
from worker.schema import faces, images
from worker.store import ResultStore

pytestmark = pytest.mark.slow

IMAGES = 500


@pytest.fixture
def two_hosts():
    with ExitStack() as stack:
        try:
            net = stack.enter_context(network(2))
        except ServerUnavailable as exc:
            unavailable(str(exc))
        services = start_stack(stack, host=net.services_address, trusted_network=net.subnet, delay=0.02)
        yield net, services


def test_two_worker_hosts_and_one_cut_off_mid_scan(two_hosts, tmp_path):
    net, services = two_hosts
    env = services.worker_env(
        CELEBSCAN_BATCH_SIZE="10",
        CELEBSCAN_VISIBILITY_TIMEOUT="10",
        CELEBSCAN_LEASE_SECONDS="8",
        CELEBSCAN_MAX_ATTEMPTS="10",
    )
    fill_bucket("photos", [f"p/{n:04d}.jpg" for n in range(IMAGES)], jpeg(200, 160))

    result = CliRunner().invoke(cli, ["scan", "s3://photos/p/"], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    store = ResultStore.connect(services.postgres_url)
    scan_id = store.latest_scan_id()
    first, second = net.hosts
    calls_from = lambda host: sum(call.client == host.address for call in services.standin.calls)  # noqa: E731

    started = time.monotonic()
    with (
        celery_workers(1, env, tmp_path, concurrency=2, host=first, name="first") as first_nodes,
        celery_workers(1, env, tmp_path, concurrency=2, host=second, name="second"),
    ):
        wait_until(lambda: calls_from(first) >= 30 and calls_from(second) >= 30, timeout=180, what="both hosts working")
        assert _reaches(first, services.redis_url)
        first.cut()
        assert not _reaches(first, services.redis_url), "the cut-off host still reaches the services"
        for pid in [*pool_children(first_nodes[0]), first_nodes[0].pid]:
            os.kill(pid, signal.SIGKILL)
        wait_for_scan(store, scan_id, timeout=400)
        elapsed = time.monotonic() - started

    summary = store.scan_summary(scan_id)
    with store.engine.connect() as conn:
        rows = conn.execute(select(func.count()).select_from(images)).scalar()
        keys = conn.execute(select(func.count(func.distinct(images.c.key)))).scalar()
        face_rows = conn.execute(select(func.count()).select_from(faces)).scalar()
        failures = conn.execute(
            select(images.c.key, images.c.attempts, images.c.error_code, images.c.error_message).where(
                images.c.status == "failed"
            )
        ).all()
    store.engine.dispose()
    print(
        f"\nanswered calls: first host {calls_from(first)} (cut off), second {calls_from(second)}; "
        f"done {summary.counts['done']}, failed {summary.counts['failed']} in {elapsed:.1f} s"
    )
    assert calls_from(first) > 0 and calls_from(second) > 0
    assert not failures, failures
    assert summary.counts == {"queued": 0, "done": IMAGES, "failed": 0}
    assert rows == keys == face_rows == IMAGES
    assert calls_from(second) >= IMAGES - calls_from(first)


def _reaches(host, url: str) -> bool:
    """Whether a TCP connection from inside ``host`` to ``url``'s address succeeds within 2 s."""
    address = urlsplit(url)
    probe = f"import socket; socket.create_connection(({address.hostname!r}, {address.port}), timeout=2)"
    return subprocess.run(host.command([sys.executable, "-c", probe]), capture_output=True).returncode == 0


def test_a_host_cut_off_in_the_middle_of_writing_a_batch_does_not_hold_its_images(tmp_path):
    """A worker host that vanishes while its batch's faces are being copied in leaves PostgreSQL
    waiting for COPY data, holding the batch's image rows; that session counts as active, so no
    idle timeout ends it. The server's TCP keepalives must, or the batch's next delivery waits forever."""
    import threading

    from tests.servers import PostgresServer, running
    from worker.listing import ListedObject
    from worker.outcomes import ImageOutcome
    from worker.queue.images import ImageQueue
    from worker.recognition import BoundingBox, Celebrity, RecognitionResult

    with ExitStack() as stack:
        try:
            net = stack.enter_context(network(1))
        except ServerUnavailable as exc:
            unavailable(str(exc))
        postgres = stack.enter_context(running(PostgresServer(host=net.services_address, trusted_network=net.subnet)))
        store = ResultStore.connect(postgres.url)
        scan_id = store.create_scan("/photos", "local")
        [image_id] = store.queue_images(scan_id, "/photos", "local", [ListedObject("a.jpg", "e1", 100)]).image_ids
        writer = subprocess.Popen(
            net.hosts[0].command([sys.executable, "-c", _STALLING_WRITER.format(url=postgres.url, image_id=image_id)]),
            stdout=subprocess.PIPE,
            text=True,
        )
        stack.callback(writer.kill)
        assert writer.stdout.readline().strip() == "stalled in the COPY"
        net.hosts[0].cut()
        writer.kill()

        box = BoundingBox(0.1, 0.1, 0.2, 0.2)
        answer = RecognitionResult(
            celebrities=(Celebrity(name="again", id="2", match_confidence=90.0, bounding_box=box),)
        )
        written = threading.Event()
        taking_over = ImageQueue(store.engine, lease_seconds=0)  # the dead host's lease ran out

        def write_again() -> None:
            assert taking_over.claim_ids([image_id], "second-host") == [image_id]
            assert taking_over.write("second-host", [ImageOutcome.done(image_id, 10, 10, answer)]).written == {image_id}
            written.set()

        threading.Thread(target=write_again, daemon=True).start()
        wait_until(written.is_set, timeout=180, what="the batch written again after the cut")
        [record] = store.result_records(scan_id)
        assert [c.name for c in record.celebrities] == ["again"]
        store.engine.dispose()


#: Writes a batch of one image with two faces through the real store, but stops for good before
#: the first COPY line is sent (after the images UPDATE has locked the row).
_STALLING_WRITER = """
import threading
import worker.outcomes as outcomes
from worker.store import ResultStore
from worker.recognition import BoundingBox, Celebrity, RecognitionResult

def stall(values):
    print("stalled in the COPY", flush=True)
    threading.Event().wait()

outcomes._copy_line = stall
box = BoundingBox(0.1, 0.1, 0.2, 0.2)
answer = RecognitionResult(celebrities=(Celebrity(name="first", id="1", match_confidence=90.0, bounding_box=box),))
store = ResultStore.connect({url!r})
store.images.claim_ids([{image_id}], "stalled-host")
store.images.write("stalled-host", [outcomes.ImageOutcome.done({image_id}, 10, 10, answer)])
"""
