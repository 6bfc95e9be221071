"""The shared Rekognition pacing: a token bucket in a real Redis server."""

import pytest

from worker.errors import ConfigurationError
from worker.rate_limit import RESERVE, RedisRateLimiter
from worker.recognizers.rekognition import RekognitionRecognizer
from worker.settings import Settings


@pytest.fixture
def client(broker_url):
    import redis

    return redis.Redis.from_url(broker_url)


def reserve(client, key, rate, burst=1, most=3600):
    verdict, wait = client.register_script(RESERVE)(keys=[key], args=[rate, burst, most])
    assert verdict == b"granted"
    return float(wait)


def test_callers_queue_for_tokens_at_the_rate(client):
    waits = [reserve(client, "bucket", rate=10) for _ in range(5)]
    assert waits[0] == 0
    for expected, wait in zip((0.1, 0.2, 0.3, 0.4), waits[1:], strict=True):
        assert expected - 0.05 <= wait <= expected + 0.001


def test_a_full_burst_is_free_then_pacing_starts(client):
    waits = [reserve(client, "bursty", rate=5, burst=3) for _ in range(4)]
    assert waits[:3] == [0, 0, 0] and 0.15 <= waits[3] <= 0.2 + 0.001


def test_every_limiter_on_the_key_shares_one_bucket(client, broker_url):
    first = RedisRateLimiter.from_url(broker_url, "shared", rate=10)
    second = RedisRateLimiter.from_url(broker_url, "shared", rate=10)
    assert first.acquire() == 0
    assert second.acquire() > 0.05


def test_throttling_slows_everybody_down(client, broker_url):
    limiter = RedisRateLimiter.from_url(broker_url, "penalized", rate=10)
    limiter.acquire()
    limiter.penalize(seconds=2.0)
    assert reserve(client, "penalized", rate=10) >= 2.0


def test_a_caller_whose_turn_is_too_far_away_takes_no_token_and_is_throttled(client, broker_url):
    """A wait never outlasts the leases of the run that waits: past the bound, the call is throttled
    (its image is tried again later) and the line behind it is not made longer."""
    from worker.errors import ThrottledError

    limiter = RedisRateLimiter.from_url(broker_url, "far", rate=10)
    limiter.penalize(seconds=5.0)  # the service said slow down: every turn is 5 s away
    with pytest.raises(ThrottledError, match="turn is 5 s away"):
        limiter.acquire(max_wait=2.0)
    assert 4.8 <= reserve(client, "far", rate=10) <= 5.1  # the refused caller took no place in the line


def test_the_recognizer_paces_through_redis_when_a_rate_is_set(broker_url, aws_env):
    recognizer = RekognitionRecognizer.from_settings(Settings(rekognition_tps=20, broker_url=broker_url))
    assert recognizer.limiter.rate == 20
    assert RekognitionRecognizer.from_settings(Settings()).limiter is None
    with pytest.raises(ConfigurationError, match="needs Redis"):
        RekognitionRecognizer.from_settings(Settings(rekognition_tps=20))


def test_persistent_throttling_backs_the_whole_fleet_off_further(client, broker_url):
    """Each throttling answer in a streak doubles the fleet-wide pause, up to a ceiling; a quiet spell resets it."""
    from worker.rate_limit import MAX_PENALTY_SECONDS

    first = RedisRateLimiter.from_url(broker_url, "streak", rate=10)
    second = RedisRateLimiter.from_url(broker_url, "streak", rate=10)
    pauses = [limiter.penalize(seconds=1.0) for limiter in (first, second, first, second, first, second)]
    assert pauses == [1.0, 2.0, 4.0, 8.0, 16.0, MAX_PENALTY_SECONDS]
    assert reserve(client, "streak", rate=10) >= sum(pauses) - 1
    client.hset("streak", "struck_at", 0)  # the last answer long ago: a new streak starts small
    assert first.penalize(seconds=1.0) == 1.0
