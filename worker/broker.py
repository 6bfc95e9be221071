"""The broker as the window's keeper sees it: window slots sent, and asked for by their message id.

Celery over Redis (kombu's Redis transport) keeps a queue's waiting messages in a list named after
the queue (priorities above 0 in lists of their own), and every message delivered to a worker and
not yet acknowledged in the ``unacked`` hash, with its delivery time in ``unacked_index``. A
message a dead node had fetched stays there until the visibility timeout; a broker restarted
without its data has none. So a window slot whose message is neither waiting in a list nor
delivered within the last lease is gone for good, and its keeper sends the slot again
(``worker/queue/slots.py``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Protocol

from worker.celery_config import QUEUE, SLOT_TASK_NAME
from worker.queue.slots import SlotMessage

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)

#: kombu's Redis transport keeps a queue's messages of priority p > 0 under QUEUE + this + p.
PRIORITY_SEPARATOR = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)
#: ... the messages delivered to a worker and not yet acknowledged in this hash, and when each was
#: delivered in this sorted set.
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"
#: Messages sent in one Redis pipeline.
PIPELINE_SIZE = 1000


class WindowBroker(Protocol):
    """What the keeper needs of the broker."""

    def send(self, messages: Sequence[SlotMessage]) -> list[SlotMessage]:
        """Put the slots' messages in the broker; returns those it could not take."""
        ...

    def present(self, messages: Collection[SlotMessage], delivered_within: float) -> set[SlotMessage] | None:
        """Of ``messages``, those still in the broker: waiting, or delivered to a worker within
        ``delivered_within`` seconds; None when the broker cannot be asked."""
        ...


def queue_keys(queue: str) -> list[str]:
    return [queue if priority == 0 else f"{queue}{PRIORITY_SEPARATOR}{priority}" for priority in PRIORITY_STEPS]


def send_slots(app: Celery, messages: Sequence[SlotMessage], producer=None) -> None:
    """Put each slot's message into the broker, its task id naming scan, slot and generation."""
    for message in messages:
        app.send_task(
            SLOT_TASK_NAME,
            args=[message.scan_id],
            kwargs={"slot": message.slot, "generation": message.generation},
            task_id=message.message_id,
            producer=producer,
            argsrepr=f"[scan {message.scan_id}, slot {message.slot}]",
        )


class CeleryRedisBroker:
    """The window's broker: Celery's app to send with, Redis to ask."""

    def __init__(self, app: Celery, broker_url: str) -> None:
        self.app = app
        self.broker_url = broker_url
        self._redis = None

    def send(self, messages: Sequence[SlotMessage]) -> list[SlotMessage]:
        if not messages:
            return []
        from kombu.exceptions import OperationalError as BrokerError

        try:
            with self.app.producer_or_acquire() as producer, producer.batch(max_size=PIPELINE_SIZE):
                send_slots(self.app, messages, producer=producer)
        except (BrokerError, OSError) as exc:
            log.warning("the broker did not take %d window slots: %s", len(messages), exc)
            return list(messages)
        return []

    def present(self, messages: Collection[SlotMessage], delivered_within: float) -> set[SlotMessage] | None:
        if not self.broker_url.startswith(("redis://", "rediss://", "unix://")):
            return None  # only Redis can be asked; its messages are taken as present
        import redis

        try:
            ids = self._ids_in_broker(delivered_within)
        except (redis.RedisError, OSError, ValueError) as exc:
            log.warning("cannot ask the broker which window slots it holds: %s", exc)
            self._redis = None
            return None
        return {message for message in messages if message.message_id in ids}

    def _client(self):
        if self._redis is None:
            import redis

            self._redis = redis.Redis.from_url(self.broker_url, socket_timeout=10)
        return self._redis

    def _ids_in_broker(self, delivered_within: float) -> set[str]:
        client = self._client()
        with client.pipeline(transaction=False) as pipe:
            for key in queue_keys(QUEUE):
                pipe.lrange(key, 0, -1)
            pipe.time()
            pipe.zrange(UNACKED_INDEX_KEY, 0, -1, withscores=True)
            *waiting_lists, (seconds, micros), delivered = pipe.execute()
        ids = {_task_id(raw) for waiting in waiting_lists for raw in waiting}
        now = seconds + micros / 1e6
        recent = [tag for tag, at in delivered if at >= now - delivered_within]
        if recent:
            for raw in client.hmget(UNACKED_KEY, recent):
                if raw is not None:
                    ids.add(_task_id(json.loads(raw)[0]))
        ids.discard("")
        return ids


def _task_id(raw) -> str:
    """The task id of a message as kombu stores it (its JSON, or the decoded dict)."""
    message = json.loads(raw) if isinstance(raw, (bytes, str)) else raw
    return str((message.get("headers") or {}).get("id") or "")
