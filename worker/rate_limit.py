"""A request rate shared by every worker on every machine: a token bucket kept in Redis.

Each call reserves a token with one atomic Lua script that reads Redis's own clock (so the
machines' clocks do not matter); when the bucket is empty the caller is told how long to wait for
its token and sleeps that long, so workers pace themselves instead of being throttled. A caller
whose turn is more than 30 s away takes no token and fails as throttled (its image is tried again
later), so a wait never outlasts the leases of the run that waits. Celery's own ``rate_limit`` is
per worker process and cannot do this.
"""

from __future__ import annotations

import logging

from worker import clock
from worker.errors import ThrottledError

log = logging.getLogger(__name__)

# Refill for the time since the last call, take one token (the balance may go below zero: that
# is the queue of callers already waiting) and answer how long this caller must wait; a caller
# that would wait longer than ARGV[3] seconds takes no token and is told how long it would have.
RESERVE = """
local rate, burst, most = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local wait = math.max(0, (1 - tokens) / rate)
if tokens >= 1 then wait = 0 end
if wait > most then
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
  redis.call('EXPIRE', KEYS[1], 3600)
  return {'refused', tostring(wait)}
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - 1), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], 3600)
return {'granted', tostring(wait)}
"""

# Take tokens away from everybody: the service said slow down. A throttling answer within
# STREAK_SECONDS of the previous one doubles the pause (up to ARGV[3] seconds): when throttling
# persists, the whole fleet backs off further instead of its retries feeding the throttling.
PENALIZE = """
local rate, base, most = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'strikes', 'struck_at')
local strikes = tonumber(state[1]) or 0
if now - (tonumber(state[2]) or 0) > tonumber(ARGV[4]) then strikes = 0 end
strikes = strikes + 1
local pause = math.min(most, base * 2 ^ (strikes - 1))
redis.call('HINCRBYFLOAT', KEYS[1], 'tokens', -rate * pause)
redis.call('HSET', KEYS[1], 'strikes', tostring(strikes), 'struck_at', tostring(now))
redis.call('EXPIRE', KEYS[1], 3600)
return tostring(pause)
"""
#: Throttling answers closer together than this count as one streak.
STREAK_SECONDS = 10.0
#: The longest fleet-wide pause one throttling answer adds.
MAX_PENALTY_SECONDS = 30.0
#: The longest a caller waits for its turn: one further back in the line takes no token and is told
#: to come back later (its image is deferred, its run's leases never outlasted by a wait).
MAX_WAIT_SECONDS = 30.0


class RedisRateLimiter:
    """At most ``rate`` calls per second across all processes sharing ``key`` in Redis."""

    def __init__(self, redis_client, key: str, rate: float, burst: float = 1.0) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate, self.burst, self.key = rate, max(1.0, burst), key
        self._reserve = redis_client.register_script(RESERVE)
        self._penalize = redis_client.register_script(PENALIZE)

    @classmethod
    def from_url(cls, url: str, key: str, rate: float, burst: float = 1.0) -> RedisRateLimiter:
        import redis

        return cls(redis.Redis.from_url(url), key, rate, burst)

    def acquire(self, max_wait: float = MAX_WAIT_SECONDS) -> float:
        """Wait for this caller's turn; returns the seconds waited. Raises :class:`ThrottledError`
        without waiting when the turn is more than ``max_wait`` seconds away."""
        verdict, wait = self._reserve(keys=[self.key], args=[self.rate, self.burst, max_wait])
        wait = float(wait)
        if verdict in (b"refused", "refused"):
            raise ThrottledError(f"the fleet's calls are paced; this one's turn is {wait:.0f} s away")
        if wait > 0:
            clock.sleep(wait)
        return wait

    def penalize(self, seconds: float = 1.0) -> float:
        """Slow every caller down after a throttling answer: by ``seconds`` worth of calls, doubled
        for each further answer in the same streak; returns the pause taken."""
        pause = float(self._penalize(keys=[self.key], args=[self.rate, seconds, MAX_PENALTY_SECONDS, STREAK_SECONDS]))
        log.info("throttled: pacing every worker down by %.1f s", pause)
        return pause
