"""The embedded scan's process pool (producer/local_pool.py)."""

from __future__ import annotations

import os

from producer.local_pool import _pool
from worker.settings import Settings


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
