"""Handing batches to a real Redis broker from a long-running process (a notebook, ``status --watch``)."""

import os

import redis

from producer.enqueue import check_broker, enqueue_batches
from worker.celery_config import QUEUE
from worker.settings import Settings


def test_enqueueing_again_and_again_holds_no_more_connections_or_files(broker_url):
    client = redis.Redis.from_url(broker_url)
    settings = Settings(broker_url=broker_url)

    def enqueue(round):
        check_broker(settings)
        assert enqueue_batches(settings, [[round * 10 + i for i in range(10)]]) == 1

    enqueue(0)
    connections, files = len(client.client_list()), len(os.listdir("/proc/self/fd"))
    for round in range(1, 20):
        enqueue(round)
    assert client.llen(QUEUE) == 20
    assert (len(client.client_list()), len(os.listdir("/proc/self/fd"))) == (connections, files)
    client.close()
