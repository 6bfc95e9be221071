"""The real parts a distributed scan runs against, started together on this machine.

PostgreSQL and Redis from Debian's packages, moto's server (S3, CloudWatch), and the Rekognition
stand-in; the process's environment points boto3 at them. Everything stops when the ``ExitStack``
closes. Used by the multi-host test and by the benchmarks.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass

import boto3
from botocore.config import Config
from moto.server import ThreadedMotoServer

from tests.conftest import AWS_TEST_ENV
from tests.imagemaker import jpeg_with_comment
from tests.rekognition_standin import RekognitionStandIn, celebrity
from tests.servers import PostgresServer, RedisServer, free_port, running


@dataclass(frozen=True)
class Stack:
    postgres_url: str
    redis_url: str
    moto_url: str
    standin: RekognitionStandIn

    def worker_env(self, **settings: str) -> dict[str, str]:
        """The environment of a worker (or producer) that uses every part, plus ``settings``."""
        return {
            **AWS_TEST_ENV,
            "AWS_ENDPOINT_URL_S3": self.moto_url,
            "AWS_ENDPOINT_URL_REKOGNITION": self.standin.url,
            "AWS_ENDPOINT_URL_CLOUDWATCH": self.moto_url,
            "CELERY_BROKER_URL": self.redis_url,
            "CELEBSCAN_DATABASE_URL": self.postgres_url,
            "CELEBSCAN_BACKEND": "rekognition",
            **settings,
        }


def start_stack(
    stack: ExitStack, host: str = "127.0.0.1", trusted_network: str | None = None, **standin_options
) -> Stack:
    """Every part listening on ``host``; PostgreSQL also lets in clients from ``trusted_network``."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    postgres = stack.enter_context(running(PostgresServer(host, trusted_network)))
    redis = stack.enter_context(running(RedisServer(host=host)))
    port = free_port()
    moto = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    moto.start()
    stack.callback(moto.stop)
    moto_url = f"http://{host}:{port}"
    saved_environ = dict(os.environ)
    stack.callback(lambda: (os.environ.clear(), os.environ.update(saved_environ)))
    os.environ.update(AWS_TEST_ENV, AWS_ENDPOINT_URL_S3=moto_url)
    standin_options.setdefault("answer", lambda key, data: {"CelebrityFaces": [celebrity("someone")]})
    standin = stack.enter_context(RekognitionStandIn(s3_endpoint=moto_url, host=host, **standin_options))
    return Stack(postgres.url, redis.url, moto_url, standin)


def fill_bucket(bucket: str, keys: list[str], body: bytes) -> None:
    """``body`` (a JPEG) under every key, each made a distinct file by a comment naming its key, so
    no object is a copy of another (celebscan would recognize a copy's picture only once)."""
    workers = 16
    s3 = boto3.client("s3", config=Config(max_pool_connections=workers))
    s3.create_bucket(Bucket=bucket)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda key: s3.put_object(Bucket=bucket, Key=key, Body=jpeg_with_comment(body, key)), keys))
