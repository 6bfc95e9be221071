"""The simulation's model of Celery (``tests/simulation/celery_model.py``) held to a real worker.

Each test starts real ``celery worker`` nodes on a real Redis, with the workers' own configuration
(``worker.celery_config``; visibility timeout 4 s, so soft and hard time limits at 3 and 4 s),
runs probe tasks (``tests/celery_probe.py``) through one of the behaviours the model claims, and
checks that the worker does what the model does given the same rules (:class:`CeleryRules`).
If Celery, kombu or celebscan's configuration changes any of them, a test here fails and the
model must follow.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import redis

from tests.celery_probe import RESTORE_SECONDS
from tests.celery_workers import celery_workers, pool_children
from tests.servers import wait_until
from tests.simulation.celery_model import MAINTAIN_SECONDS, CeleryRules
from worker.broker import UNACKED_KEY
from worker.celery_config import QUEUE, make_celery
from worker.settings import Settings

pytestmark = pytest.mark.slow

VISIBILITY = 4


@pytest.fixture
def probe(broker_url, tmp_path, request):
    """What a probe needs: the workers' environment, the rules the model reads from the same
    settings, a way to start nodes and to send the probe task, and its records."""
    visibility = getattr(request, "param", VISIBILITY)
    settings = Settings(broker_url=broker_url, visibility_timeout=visibility)

    class Probe:
        env = {"CELERY_BROKER_URL": broker_url, "CELEBSCAN_VISIBILITY_TIMEOUT": str(visibility)}
        rules = CeleryRules.of(settings, concurrency=1)
        client = redis.Redis.from_url(broker_url)
        sender = make_celery(settings)

        def nodes(self, count: int = 1, name: str = "probe"):
            return celery_workers(count, self.env, tmp_path, app="tests.celery_probe", name=name)

        def send(self, key: str, seconds: float, after_soft_limit: float = 0.0, countdown: float = 0.0) -> None:
            self.sender.send_task(
                "probe.run", args=[key, seconds, after_soft_limit], countdown=countdown or None, queue=QUEUE
            )

        def records(self, key: str) -> list[tuple[float, str, int]]:
            rows = [raw.decode().split() for raw in self.client.lrange(key, 0, -1)]
            return [(float(at), what, int(pid)) for at, what, pid in rows]

        def starts(self, key: str) -> list[tuple[float, str, int]]:
            return [row for row in self.records(key) if row[1] == "start"]

        def wait_for_starts(self, key: str, count: int, timeout: float) -> list[tuple[float, str, int]]:
            wait_until(lambda: len(self.starts(key)) >= count, timeout=timeout, what=f"{count} runs of {key}")
            return self.starts(key)

    return Probe()


def test_a_hard_time_limit_requeues_the_message_as_the_model_does(probe):
    """The model: the pool process is killed at ``time_limit``; its message is requeued at once
    unless ``task_acks_on_timeout``. (Celery's own default acknowledges it: a window slot was lost.)"""
    assert probe.rules.acks_on_timeout is False, "celebscan's workers requeue a message their time limit killed"
    with probe.nodes():
        probe.send("hard", seconds=60, after_soft_limit=60)
        first, second = probe.wait_for_starts("hard", 2, timeout=30)[:2]
    records = probe.records("hard")
    assert ("soft" in [what for _, what, _ in records]) and "end" not in [what for _, what, _ in records]
    killed_at = first[0] + probe.rules.time_limit
    assert second[0] - killed_at < VISIBILITY / 2, "delivered again at once, not after the visibility timeout"
    assert second[2] != first[2], "in a new pool process"


def test_a_soft_time_limit_is_raised_in_the_run_and_a_run_that_returns_is_acknowledged(probe):
    with probe.nodes():
        probe.send("soft", seconds=60)
        probe.wait_for_starts("soft", 1, timeout=30)
        wait_until(lambda: "end" in [what for _, what, _ in probe.records("soft")], timeout=30, what="the run to end")
        start, soft = probe.records("soft")[:2]
        assert soft[1] == "soft" and abs(soft[0] - start[0] - probe.rules.soft_time_limit) < 1.0
        wait_until(
            lambda: probe.client.hlen(UNACKED_KEY) == 0 and probe.client.llen(QUEUE) == 0,
            timeout=10,
            what="the message acknowledged",
        )
    assert len(probe.starts("soft")) == 1, "acknowledged after the run: nothing left to deliver again"


@pytest.mark.parametrize("probe", [60], indirect=True)  # no time limit nor visibility timeout in the way
def test_a_pool_process_killed_has_its_message_requeued_once_the_node_notices(probe):
    """The model: within MAINTAIN_SECONDS the node notices, requeues the message (reject on worker
    lost) and starts a new pool process."""
    assert probe.rules.reject_on_worker_lost
    with probe.nodes():
        probe.send("child", seconds=2.5)
        [(started, _, pid)] = probe.wait_for_starts("child", 1, timeout=30)
        os.kill(pid, signal.SIGKILL)
        killed = time.time()
        again = probe.wait_for_starts("child", 2, timeout=30)[1]
    assert again[0] - killed < MAINTAIN_SECONDS + 2, "requeued once noticed, not after the visibility timeout"
    assert again[2] != pid


def test_a_node_killed_leaves_its_message_unacknowledged_until_the_visibility_timeout(probe):
    """The model: a dead node's messages come back only through a live node's sweep of messages
    unacknowledged for ``visibility_timeout`` (every RESTORE_INTERVAL seconds in production)."""
    with probe.nodes(name="doomed") as [doomed]:
        probe.send("node", seconds=2.5)
        [(started, _, pid)] = probe.wait_for_starts("node", 1, timeout=30)
        assert pid in pool_children(doomed)
        with probe.nodes(name="survivor"):
            os.killpg(doomed.pid, signal.SIGKILL)
            assert probe.client.hlen(UNACKED_KEY) == 1, "the dead node's message waits, unacknowledged"
            again = probe.wait_for_starts("node", 2, timeout=VISIBILITY + 10 * RESTORE_SECONDS + 30)[1]
    assert VISIBILITY <= again[0] - started <= VISIBILITY + 10 * RESTORE_SECONDS, "back after the timeout, by a sweep"


@pytest.mark.parametrize("probe", [60], indirect=True)  # no time limit in the way
def test_a_node_fetches_countdowns_beyond_its_prefetch_and_plain_messages_up_to_it(probe):
    """The model: a node fetches while the messages it runs, or holds due, are fewer than its
    prefetch; a countdown it holds until due does not count, so an idle node fetches every
    countdown at the head of the queue (one node hoards a window of them, finding 2 of issue 27)."""
    assert probe.rules.prefetch == 1
    with probe.nodes():
        for _ in range(3):
            probe.send("later", seconds=0.1, countdown=60)
        for _ in range(2):
            probe.send("plain", seconds=30)
        probe.wait_for_starts("plain", 1, timeout=30)
        wait_until(lambda: probe.client.hlen(UNACKED_KEY) == 4, timeout=10, what="three countdowns and a run held")
        assert probe.client.llen(QUEUE) == 1, "the second plain message waits in Redis: the prefetch is full"


def test_a_countdown_held_past_the_visibility_timeout_comes_back_while_held_and_runs_twice(probe):
    """The model: every unacknowledged message older than the visibility timeout goes back to the
    queue, whether or not its node is alive (finding 4 of issue 27)."""
    with probe.nodes():
        probe.send("held", seconds=0.1, countdown=VISIBILITY + 4 * RESTORE_SECONDS)
        starts = probe.wait_for_starts("held", 2, timeout=3 * VISIBILITY + 30)
    assert len(starts) == 2 and abs(starts[1][0] - starts[0][0]) < VISIBILITY
