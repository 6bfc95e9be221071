"""Handing batches to a real Redis broker from a long-running process (a notebook, ``status --watch``)."""

import redis

from producer.enqueue import check_broker, open_window
from worker.celery_config import QUEUE
from worker.settings import Settings
from worker.store import ResultStore


def test_enqueueing_again_and_again_holds_no_more_broker_connections(broker_url, sqlite_url):
    client = redis.Redis.from_url(broker_url)
    settings = Settings(broker_url=broker_url, window=3)
    store = ResultStore.connect(sqlite_url)

    def enqueue(round):
        check_broker(settings)
        scan_id = store.create_scan(f"/pictures/{round}", "rekognition")
        assert open_window(settings, store.engine, scan_id) == 3

    enqueue(0)
    connections = len(client.client_list())
    for round in range(1, 20):
        enqueue(round)
    assert client.llen(QUEUE) == 20 * 3
    assert len(client.client_list()) == connections
    client.close()
    store.engine.dispose()
