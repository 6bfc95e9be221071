"""How long a scan takes at the Rekognition quota, and the fleet that keeps that pace (`estimate`,
`status`): the quota from the setting or from Service Quotas (a stand-in speaking its protocol),
the time per image measured from an earlier scan."""

from __future__ import annotations

import math
import re

import pytest

from tests.clirun import celebscan
from tests.imagemaker import jpeg
from tests.rekognition_standin import celebrity
from tests.service_quotas_standin import CELEBRITIES, ServiceQuotasStandIn, quota
from worker.listing import ListedObject
from worker.store import ResultStore


@pytest.fixture
def photos(s3, bucket, aws_env, rekognition, sqlite_url):
    for number in range(20):
        s3.put_object(Bucket=bucket, Key=f"sample/{number}.jpg", Body=jpeg(200 + number, 150))
        s3.put_object(Bucket=bucket, Key=f"rest/{number}.jpg", Body=jpeg(300 + number, 150))
    rekognition.answer = lambda key, data: {"CelebrityFaces": [celebrity("someone")]}
    env = {**aws_env, "AWS_ENDPOINT_URL_REKOGNITION": rekognition.url, "CELEBSCAN_DATABASE_URL": sqlite_url}
    return bucket, env


def estimate(env, source: str) -> str:
    return celebscan("estimate", source, env=env).output


def test_the_time_at_the_quota_and_the_fleet_measured_from_a_sample(photos, rekognition):
    bucket, scan_env = photos
    scan_env = {**scan_env, "CELEBSCAN_CALLS_IN_FLIGHT": "4"}
    env = {**scan_env, "CELEBSCAN_REKOGNITION_TPS": "50"}
    before = estimate(env, f"s3://{bucket}/")
    assert "time at the quota: 40 calls at 50 calls/s (CELEBSCAN_REKOGNITION_TPS) take 1 s" in before, before
    assert "not measured yet" in before

    rekognition.delay = 0.1  # each call takes 100 ms, as the service might
    celebscan("scan", f"s3://{bucket}/sample/", "--backend", "rekognition", "--workers", "1", env=scan_env)
    after = estimate(env, f"s3://{bucket}/")
    found = re.search(
        r"workers to keep that pace: (\d+) process(?:es)? \((\d+\.\d+) s per image, measured; 4 calls in flight "
        r"each, CELEBSCAN_CALLS_IN_FLIGHT\) = (\d+) machines? of 2",
        after,
    )
    assert found, after
    processes, seconds = int(found[1]), float(found[2])
    lowest, highest = math.ceil(50 * (seconds - 0.005) / 4), math.ceil(50 * (seconds + 0.005) / 4)  # rounded
    assert seconds >= 0.1 and lowest <= processes <= highest, "enough calls in flight to make 50 calls a second"
    assert int(found[3]) == math.ceil(processes / 2)
    assert "time at the quota: 20 calls at 50 calls/s" in after and "$0.0416 per machine-hour" in after


@pytest.mark.parametrize("applied", [True, False])
def test_the_quota_comes_from_service_quotas(photos, monkeypatch, applied):
    bucket, env = photos
    with ServiceQuotasStandIn() as quotas:
        other = quota("Transactions per second per account for the Amazon Rekognition Image operation DetectFaces", 99)
        (quotas.applied if applied else quotas.defaults).extend([other, quota(CELEBRITIES, 20)])
        output = estimate({**env, "AWS_ENDPOINT_URL_SERVICE_QUOTAS": quotas.url}, f"s3://{bucket}/")
    where = "the account's quota" if applied else "the default quota"
    assert f"40 calls at 20 calls/s ({where} in us-east-1 (Service Quotas)) take 2 s" in output, output
    assert quotas.requests == (
        ["ListServiceQuotas"] if applied else ["ListServiceQuotas", "ListAWSDefaultServiceQuotas"]
    )


def test_without_a_quota_estimate_says_how_to_give_one(photos):
    bucket, env = photos
    with ServiceQuotasStandIn() as quotas:  # answers, but knows no RecognizeCelebrities quota
        output = estimate({**env, "AWS_ENDPOINT_URL_SERVICE_QUOTAS": quotas.url}, f"s3://{bucket}/")
    assert "time: unknown" in output and "set CELEBSCAN_REKOGNITION_TPS" in output


def test_status_shows_the_time_left_at_the_quota(sqlite_url):
    store = ResultStore.connect(sqlite_url)
    scan_id = store.create_scan("s3://photos/", "rekognition")
    listed = [ListedObject(key=f"{number}.jpg", etag="e", size=100) for number in range(7_200)]
    store.queue_images(scan_id, "photos", "rekognition", listed)
    env = {"CELEBSCAN_DATABASE_URL": sqlite_url, "CELEBSCAN_REKOGNITION_TPS": "2"}
    output = celebscan("status", str(scan_id), env=env).output
    assert "at the quota (CELEBSCAN_REKOGNITION_TPS=2 calls/s): 1 h 00 min for the 7,200 images queued" in output
    store.engine.dispose()
