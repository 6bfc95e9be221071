"""A Celery app with the workers' own configuration and one probe task: what a real worker does
with a message is checked against the simulation's model of Celery (``tests/test_celery_model.py``).

Each run of the probe records, in a Redis list named by the test, when it started (and in which
pool process), when its soft time limit struck, and when it ended. The one setting changed is how
often a node looks for messages whose visibility timeout passed (kombu sweeps every 100 s by
default; here every second, so the tests need not wait for it).
"""

from __future__ import annotations

import os
import time

import redis
from billiard.exceptions import SoftTimeLimitExceeded

from worker.celery_config import make_celery, time_limits
from worker.settings import Settings

settings = Settings.from_env()
app = make_celery(settings)
#: How often (seconds) a node here puts back the messages whose visibility timeout passed.
RESTORE_SECONDS = 1
app.conf.broker_transport_options = {
    **app.conf.broker_transport_options,
    "unacked_restore_interval": RESTORE_SECONDS,
    "unacked_restore_throttle": 1,
}


def record(key: str, what: str) -> None:
    redis.Redis.from_url(settings.broker_url).rpush(key, f"{time.time():.3f} {what} {os.getpid()}")


@app.task(name="probe.run", **time_limits(settings))
def run(key: str, seconds: float, after_soft_limit: float = 0.0) -> None:
    """Work for ``seconds``; when the soft time limit strikes, go on for ``after_soft_limit`` more."""
    record(key, "start")
    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded:
        record(key, "soft")
        time.sleep(after_soft_limit)
    record(key, "end")
