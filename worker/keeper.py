"""The window's keeper: one process of the fleet at a time sends the window slots that are due and
repairs those whose message or run is gone, so that no scan waits for a human.

Every worker process runs a keeper thread beside its work; the one holding the ``keepers`` row's
lease (one guarded statement; the others look every few seconds whether it lapsed) does, each
second (:meth:`WindowKeeper.tick`):

- slots parked until now (a slot that found nothing to claim) are sent;
- slots whose run stopped renewing them for a lease (its node died, it stalled) are sent again;
- once a lease after a slot was sent, if the broker holds its message neither waiting nor recently
  delivered (a broker restarted without its data, a node that died with it fetched, a crash between
  a commit and the send), the slot is sent again;
- slots of scans that finished end, and the write receipts of runs that crashed an hour ago go.

So a dead node's slots come back within its lease plus the keeper's (the keeper itself may have
died with it), far sooner than the broker's visibility timeout. A slot sent again runs under a new
generation: its old message, should it come back, changes nothing.
"""

from __future__ import annotations

import logging
import os
import random
import uuid
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Engine, bindparam, update

from worker import clock, threads
from worker.broker import WindowBroker
from worker.database import align_clock, utcnow
from worker.queue.images import ImageQueue
from worker.queue.slots import WINDOW_KEEPER, SlotMessage, WindowSlots
from worker.schema import keepers
from worker.sql import dialect_insert

log = logging.getLogger(__name__)

#: How often the keeper works, and how often the other processes look whether it is still there.
TICK_SECONDS = 1.0
STANDBY_SECONDS = 5.0
#: The keeper's own lease: a keeper that died is replaced within this (at most the claims' lease).
KEEPER_LEASE_SECONDS = 30.0
#: How often the keeper asks the broker for slots sent over a lease ago (and clears old write receipts).
INSPECT_SECONDS = 5.0
#: A write's receipt is kept at least this long (a replay comes within the database's patience).
RECEIPTS_KEPT_SECONDS = 3600.0


@dataclass
class KeeperTick:
    """What one tick did (logged when it did anything)."""

    sent: int = 0
    not_sent: int = 0
    ended: int = 0
    lapsed: int = 0
    lost: int = 0

    def __bool__(self) -> bool:
        return any((self.sent, self.not_sent, self.ended, self.lapsed, self.lost))


#: Built once: every worker process runs it every few seconds.
_TAKE_OR_RENEW = (
    update(keepers)
    .where(
        keepers.c.name == WINDOW_KEEPER,
        (keepers.c.holder == bindparam("me")) | (keepers.c.held_at < bindparam("cutoff")),
    )
    .values(holder=bindparam("me"), held_at=bindparam("now"))
)


class WindowKeeper:
    def __init__(self, engine: Engine, broker: WindowBroker, lease_seconds: float, name: str | None = None) -> None:
        self.engine = engine
        self.broker = broker
        self.lease_seconds = lease_seconds
        self.slots = WindowSlots(engine, lease_seconds)
        self.name = name or f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.keeper_lease = timedelta(seconds=min(KEEPER_LEASE_SECONDS, lease_seconds))
        self._inspected_at = float("-inf")

    def hold(self) -> bool:
        """Take the keeper's lease, or renew it (one statement, a second the very first time);
        False while another live process holds it."""
        now = utcnow()
        with self.engine.begin() as conn:
            held = conn.execute(_TAKE_OR_RENEW, {"me": self.name, "now": now, "cutoff": now - self.keeper_lease})
            if held.rowcount:
                return True
            created = conn.execute(
                dialect_insert(self.engine, keepers)
                .values(name=WINDOW_KEEPER, holder=self.name, held_at=now)
                .on_conflict_do_nothing()
            )
            return bool(created.rowcount)

    def tick(self) -> KeeperTick:
        """One round of the keeper's duties (the caller holds the lease)."""
        done = KeeperTick()
        done.ended = self.slots.end_finished()
        done.lapsed = len(self.slots.repair_lapsed())
        if clock.monotonic() - self._inspected_at >= INSPECT_SECONDS:
            self._inspected_at = clock.monotonic()
            done.lost = len(self.repair_lost())
            ImageQueue(self.engine).forget_old_receipts(RECEIPTS_KEPT_SECONDS)
        messages = self.slots.dispatch()
        not_sent = self.broker.send(messages)
        self.slots.unsend(not_sent)
        done.sent, done.not_sent = len(messages) - len(not_sent), len(not_sent)
        if done:
            log.info("window keeper: %s", done)
        return done

    def repair_lost(self) -> list[SlotMessage]:
        """Slots sent over a lease ago whose message the broker holds no more: sent again."""
        suspects = self.slots.sent_before(utcnow() - timedelta(seconds=self.lease_seconds))
        if not suspects:
            return []
        present = self.broker.present(suspects, delivered_within=self.lease_seconds)
        if present is None:
            return []
        repaired = self.slots.repair_lost([message for message in suspects if message not in present])
        for message in repaired:
            log.warning(
                "window slot %d of scan %d: its message is gone from the broker; it is sent again",
                message.slot,
                message.scan_id,
            )
        return repaired

    def run(self, stop: threads.Event) -> None:
        """Keep the window until ``stop`` is set: work each second while holding the lease."""
        while True:
            keeping = False
            try:
                align_clock(self.engine)
                keeping = self.hold()
                if keeping:
                    self.tick()
            except Exception:  # the database or the broker is away: the next round tries again
                log.warning("the window keeper could not do its round", exc_info=True)
            if stop.wait(TICK_SECONDS if keeping else random.uniform(STANDBY_SECONDS / 2, STANDBY_SECONDS)):
                return


def keep_the_window_in_a_thread(keeper: WindowKeeper) -> threads.Event:
    """Start ``keeper`` on a daemon thread; returns the event that stops it."""
    stop = threads.event()
    threads.start(lambda: keeper.run(stop), name="window-keeper")
    return stop
