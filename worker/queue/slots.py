"""A window slot's lifecycle: the scan's window, one row per slot, each at most one live message.

    opened ──▶ due ──dispatch (generation + 1)──▶ sent ──take by run T (its generation)──▶ running by T
                ▲                                  │                                       │ │ │
                │                                  │     ┌──── send on by T (gen + 1) ◀────┘ │ │
                │                                  ▼     ▼                                   │ │
                │                                 sent ◀─┘                                   │ │
                ├──────────── park by T (come back in s seconds) ◀───────────────────────────┘ │
                │                                                   end by T (scan finished) ──┴──▶ ended
                ├── repair: a running slot whose holder stopped renewing it for a lease
                └── repair: a sent slot whose message is no longer in the broker (lost, or held by a dead node)

A window slot is a small message "take the next batch of scan N" (``worker/tasks.py``). The
broker holds at most one message per slot: the one named by the slot's *generation* (its task id
says scan, slot and generation). A run takes the slot only with the message of its current
generation, and only the run that holds it (``holder = T``) sends it on, parks it or ends it, so
a message delivered twice, late, or after the slot moved on changes nothing: the window never
grows, whatever the redeliveries, duplicates and ``--resume``\\ s. A later delivery of the current
message takes the slot over from the run that holds it (a run whose time limit killed it has its
message requeued by Celery, and that delivery must not wait for the dead run's lease).

A slot that finds nothing to claim is *parked* here until its next turn is due, not put in the
broker with a countdown: a countdown message is reserved by whichever worker fetched it, beyond
its prefetch, and held there until due, so one worker could hoard the window while others idle,
and a node that died holding them stalled the scan until the broker's visibility timeout.

Nothing here waits for a human: the window's keeper (``worker/keeper.py``) sends due slots, and
repairs a slot whose run stopped renewing it for a lease (its node died, or a time limit ate its
message) and a slot whose message is gone from the broker (lost with a broker restart, held by a
dead node, or never sent because a crash fell between the commit and the send). A repaired slot
is sent again under a new generation; its old message, if it ever comes back, changes nothing.
Every transition is one statement guarded by the state it leaves and, for a run's, the holder.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Engine, and_, func, insert, or_, select, update

from worker.database import utcnow
from worker.retry import retry_database
from worker.schema import scans, window_slots

DUE, SENT, RUNNING, ENDED = "due", "sent", "running", "ended"
#: The ``keepers`` row whose holder keeps the window (``worker/keeper.py``).
WINDOW_KEEPER = "window"
#: A window slot's message id: one per slot and generation, so the broker can be asked for it.
MESSAGE_ID_PREFIX = "celebscan-slot"


@dataclass(frozen=True, order=True)
class SlotMessage:
    """The message of one generation of a slot."""

    scan_id: int
    slot: int
    generation: int

    @property
    def message_id(self) -> str:
        return f"{MESSAGE_ID_PREFIX}-{self.scan_id}-{self.slot}-{self.generation}"

    @classmethod
    def from_message_id(cls, message_id: str) -> SlotMessage | None:
        prefix, _, rest = message_id.partition(f"{MESSAGE_ID_PREFIX}-")
        parts = rest.split("-")
        if prefix or len(parts) != 3 or not all(part.isdigit() for part in parts):
            return None
        scan_id, slot, generation = (int(part) for part in parts)
        return cls(scan_id, slot, generation)


@dataclass(frozen=True)
class Taken:
    """A slot a run holds now, and how many turns in a row it found nothing to claim."""

    message: SlotMessage
    idle_rounds: int


@dataclass(frozen=True)
class WindowState:
    """A scan's window at a glance (``status``, ``metrics``)."""

    due: int = 0
    sent: int = 0
    running: int = 0
    ended: int = 0
    repairs: int = 0
    #: Running slots whose holder has not renewed them for a lease: the keeper repairs them.
    lapsed: int = 0

    @property
    def size(self) -> int:
        return self.due + self.sent + self.running + self.ended


def open_window(conn, scan_id: int, window: int) -> int:
    """Give the unfinished scan ``window`` slots, due now (in the caller's transaction: the scan's
    own, or ``--resume``'s): slots it has already are left as they are, so the window never grows,
    but those that ended (its ``--max-cost`` budget was spent) are due again. Returns how many were
    made or opened again."""
    now = utcnow()
    reopened = conn.execute(
        update(window_slots)
        .where(window_slots.c.scan_id == scan_id, window_slots.c.state == ENDED)
        .values(state=DUE, due_at=now, idle_rounds=0)
    ).rowcount
    existing = set(conn.execute(select(window_slots.c.slot).where(window_slots.c.scan_id == scan_id)).scalars())
    rows = [dict(scan_id=scan_id, slot=slot, state=DUE, due_at=now) for slot in range(window) if slot not in existing]
    if rows:
        conn.execute(insert(window_slots), rows)
    return reopened + len(rows)


def renew(conn, tokens: list[str], now: datetime) -> None:
    """Extend the lease of the slots the ``tokens`` hold (``worker/queue/leases.py``)."""
    conn.execute(
        update(window_slots)
        .where(window_slots.c.state == RUNNING, window_slots.c.holder.in_(tokens))
        .values(held_at=now)
    )


def _the(message: SlotMessage):
    return and_(window_slots.c.scan_id == message.scan_id, window_slots.c.slot == message.slot)


def _held_by(message: SlotMessage, token: str):
    return and_(_the(message), window_slots.c.state == RUNNING, window_slots.c.holder == token)


class WindowSlots:
    """The ``window_slots`` table: every transition of a slot, each one guarded statement."""

    def __init__(self, engine: Engine, lease_seconds: float = 120.0) -> None:
        self.engine = engine
        self.lease = timedelta(seconds=lease_seconds)

    # -- a run's ----------------------------------------------------------------------------------

    @retry_database
    def take(self, message: SlotMessage, token: str) -> Taken | None:
        """Hold the slot for the run ``token`` if ``message`` is its current one; None when the
        message is stale (the slot moved on, was repaired, or its scan's window ended)."""
        with self.engine.begin() as conn:
            idle_rounds = conn.execute(
                update(window_slots)
                .where(
                    _the(message),
                    window_slots.c.generation == message.generation,
                    window_slots.c.state.in_([SENT, RUNNING]),
                )
                .values(state=RUNNING, holder=token, held_at=utcnow())
                .returning(window_slots.c.idle_rounds)
            ).scalar()
        return None if idle_rounds is None else Taken(message, idle_rounds)

    @retry_database
    def send_on(self, message: SlotMessage, token: str) -> SlotMessage | None:
        """The run is done with its turn and the slot goes on at once: its next generation, to be
        put in the broker after this commits (None: the run no longer holds the slot)."""
        with self.engine.begin() as conn:
            generation = conn.execute(
                update(window_slots)
                .where(_held_by(message, token))
                .values(
                    state=SENT, holder=None, held_at=utcnow(), idle_rounds=0, generation=window_slots.c.generation + 1
                )
                .returning(window_slots.c.generation)
            ).scalar()
        return None if generation is None else SlotMessage(message.scan_id, message.slot, generation)

    @retry_database
    def park(self, message: SlotMessage, token: str, seconds: float, idle_rounds: int) -> bool:
        """Nothing to do now: the slot waits here for ``seconds`` (the keeper sends it then)."""
        with self.engine.begin() as conn:
            return bool(
                conn.execute(
                    update(window_slots)
                    .where(_held_by(message, token))
                    .values(
                        state=DUE,
                        holder=None,
                        held_at=None,
                        due_at=utcnow() + timedelta(seconds=seconds),
                        idle_rounds=idle_rounds,
                    )
                ).rowcount
            )

    @retry_database
    def end(self, message: SlotMessage, token: str) -> bool:
        """The scan is finished: the slot ends with it."""
        with self.engine.begin() as conn:
            return bool(
                conn.execute(
                    update(window_slots).where(_held_by(message, token)).values(state=ENDED, holder=None)
                ).rowcount
            )

    @retry_database
    def unsend(self, messages: Collection[SlotMessage]) -> None:
        """The broker did not take these messages: their slots are due again (the keeper retries)."""
        if not messages:
            return
        with self.engine.begin() as conn:
            for message in messages:
                conn.execute(
                    update(window_slots)
                    .where(_the(message), window_slots.c.generation == message.generation, window_slots.c.state == SENT)
                    .values(state=DUE, due_at=utcnow())
                )

    # -- the keeper's -----------------------------------------------------------------------------

    @retry_database
    def dispatch(self, limit: int = 1000, scan_id: int | None = None) -> list[SlotMessage]:
        """Slots due now become sent, each under its next generation: the messages to put in the
        broker after this commits (a crash before they are sent leaves them to :meth:`repair_lost`)."""
        now = utcnow()
        due = [window_slots.c.state == DUE, window_slots.c.due_at <= now]
        if scan_id is not None:
            due.append(window_slots.c.scan_id == scan_id)
        with self.engine.begin() as conn:
            picked = select(window_slots.c.scan_id, window_slots.c.slot).where(*due).order_by(window_slots.c.due_at)
            if conn.dialect.name == "postgresql":
                picked = picked.with_for_update(skip_locked=True)
            chosen = conn.execute(picked.limit(limit)).all()
            if not chosen:
                return []
            sent = conn.execute(
                update(window_slots)
                .where(
                    or_(*(and_(window_slots.c.scan_id == scan, window_slots.c.slot == slot) for scan, slot in chosen)),
                    *due,
                )
                .values(state=SENT, held_at=now, generation=window_slots.c.generation + 1)
                .returning(window_slots.c.scan_id, window_slots.c.slot, window_slots.c.generation)
            ).all()
        return sorted(SlotMessage(*row) for row in sent)

    @retry_database
    def end_finished(self) -> int:
        """Slots waiting here whose scan finished meanwhile end without a message."""
        finished = select(scans.c.id).where(scans.c.finished_at.is_not(None))
        with self.engine.begin() as conn:
            return conn.execute(
                update(window_slots)
                .where(window_slots.c.state == DUE, window_slots.c.scan_id.in_(finished))
                .values(state=ENDED)
            ).rowcount

    @retry_database
    def repair_lapsed(self) -> list[SlotMessage]:
        """Running slots whose holder stopped renewing them for a lease (its node died, it stalled,
        or its message was acknowledged with its killed run) are due again. Returns those repaired."""
        lapsed = and_(window_slots.c.state == RUNNING, window_slots.c.held_at < utcnow() - self.lease)
        return self._repair(lapsed)

    def sent_before(self, moment: datetime) -> list[SlotMessage]:
        """Slots sent before ``moment`` and not taken since: the keeper asks the broker for them."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(window_slots.c.scan_id, window_slots.c.slot, window_slots.c.generation).where(
                    window_slots.c.state == SENT, window_slots.c.held_at < moment
                )
            ).all()
        return sorted(SlotMessage(*row) for row in rows)

    @retry_database
    def repair_lost(self, messages: Sequence[SlotMessage]) -> list[SlotMessage]:
        """These slots' messages are gone from the broker: each still sent under that generation is
        due again (one taken meanwhile is left to its run)."""
        if not messages:
            return []
        lost = and_(
            window_slots.c.state == SENT,
            or_(*(and_(_the(message), window_slots.c.generation == message.generation) for message in messages)),
        )
        return self._repair(lost)

    def _repair(self, condition) -> list[SlotMessage]:
        with self.engine.begin() as conn:
            rows = conn.execute(
                update(window_slots)
                .where(condition)
                .values(state=DUE, holder=None, held_at=None, due_at=utcnow(), repairs=window_slots.c.repairs + 1)
                .returning(window_slots.c.scan_id, window_slots.c.slot, window_slots.c.generation)
            ).all()
        return sorted(SlotMessage(*row) for row in rows)

    # -- reading ----------------------------------------------------------------------------------

    def states(self, scan_ids: Sequence[int]) -> dict[int, WindowState]:
        """Each scan's window (scans with none are left out)."""
        if not scan_ids:
            return {}
        lapsed_before = utcnow() - self.lease
        lapsed = and_(window_slots.c.state == RUNNING, window_slots.c.held_at < lapsed_before)
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(
                    window_slots.c.scan_id,
                    window_slots.c.state,
                    func.count(),
                    func.sum(window_slots.c.repairs),
                    func.sum(func.cast(lapsed, window_slots.c.slot.type)),
                )
                .where(window_slots.c.scan_id.in_(list(scan_ids)))
                .group_by(window_slots.c.scan_id, window_slots.c.state)
            ).all()
        counts: dict[int, dict] = {}
        for scan_id, state, count, repairs, lapsed_count in rows:
            entry = counts.setdefault(scan_id, dict(repairs=0, lapsed=0))
            entry[state] = count
            entry["repairs"] += int(repairs or 0)
            entry["lapsed"] += int(lapsed_count or 0)
        return {scan_id: WindowState(**entry) for scan_id, entry in counts.items()}
