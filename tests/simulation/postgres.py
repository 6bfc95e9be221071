"""PostgreSQL under the simulation: every task's transactions interleave statement by statement.

Each simulated task (a process's run, its lanes, its lease keeper, the window's keeper...) holds a
connection of its own, as a real process does, and yields to the scheduler before every statement
(:class:`PausingCursor`) and commit: the seed decides which task's statement comes next. The
statements themselves run on the real server, so row locks, ``FOR UPDATE SKIP LOCKED``, unique
indexes and read-committed snapshots behave as in production. A statement that must wait for
another transaction's lock leaves its task *blocked*: psycopg2 runs in its asynchronous ("green")
mode here, and while it waits for a result, :func:`wait` asks the server (``pg_blocking_pids``)
whether the backend waits for a lock; if so the task yields until it no longer does, and the
others run (one of them will let the lock go). Whether a statement waits is decided by which
statements ran before it, so a seed mostly replays the same run; not always: when several
transactions wait for one row, which of them the server lets go on first is its own choice (seed
43 with the time-limit mutation ran 3,370 to 3,551 steps), so a bug put back is held to be caught
by one of its seeds.
"""

from __future__ import annotations

import select
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg2
import psycopg2.extensions

from tests.simulation.scheduler import Scheduler

_scheduler: Scheduler | None = None
_monitor = None  # a connection of the simulation's own, that asks which backends wait for locks
#: What the interleaving did in this process: statements that let another task run while their
#: transaction was open, and statements that waited for another transaction's lock.
counts = {"statements interleaved in a transaction": 0, "lock waits": 0}
#: A statement that has not answered after this long may wait for a lock: the server is asked.
FAST_SECONDS = 0.001
#: Simulated time a statement takes: tasks whose transactions overlap in time interleave (one that
#: took no time would run whole before any task that became ready a moment later).
STATEMENT_SECONDS = (0.001, 0.02)


def _pause(connection) -> None:
    scheduler = _scheduler
    if scheduler is not None and scheduler.in_task() and not scheduler.dying():
        if connection.status == psycopg2.extensions.STATUS_IN_TRANSACTION:
            counts["statements interleaved in a transaction"] += 1
        scheduler.sleep(scheduler.rng.uniform(*STATEMENT_SECONDS))


class PausingCursor(psycopg2.extensions.cursor):
    """A cursor whose every statement first lets the scheduler run another task."""

    def execute(self, query, vars=None):  # noqa: A002 (psycopg2's own name)
        _pause(self.connection)
        return super().execute(query, vars)

    def executemany(self, query, vars_list):
        _pause(self.connection)
        return super().executemany(query, vars_list)

    def copy_expert(self, sql, file, size=8192):
        """psycopg2 runs COPY only in its blocking mode: the write's COPY of faces runs so, the
        other tasks waiting (it never waits for a lock: its images' rows are locked by the write)."""
        _pause(self.connection)
        psycopg2.extensions.set_wait_callback(None)
        try:
            return super().copy_expert(sql, file, size)
        finally:
            psycopg2.extensions.set_wait_callback(wait)


def _blocked(pid: int) -> bool:
    with _monitor.cursor() as cursor:
        cursor.execute("SELECT cardinality(pg_blocking_pids(%s)) > 0", (pid,))
        return bool(cursor.fetchone()[0])


def deadlocked(pids: list[int]) -> bool:
    """Whether some of these waiting processes wait only for each other (a cycle)."""
    with _monitor.cursor() as cursor:
        cursor.execute("SELECT pid, pg_blocking_pids(pid) FROM unnest(%s::int[]) AS pid", (pids,))
        waits = {pid: set(blockers) for pid, blockers in cursor.fetchall()}
    stuck = {pid for pid, blockers in waits.items() if blockers}
    changed = True
    while changed:  # keep only those whose every blocker is itself stuck
        still = {pid for pid in stuck if waits[pid] <= stuck}
        changed, stuck = still != stuck, still
    return bool(stuck)


def _readable(fd: int, timeout: float = 0.0) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def wait(connection) -> None:
    """psycopg2's wait callback: wait for the server; a task whose statement waits for a lock yields."""
    while True:
        state = connection.poll()
        if state == psycopg2.extensions.POLL_OK:
            return
        fd = connection.fileno()
        if state == psycopg2.extensions.POLL_WRITE:
            select.select([], [fd], [])
            continue
        scheduler = _scheduler
        in_task = scheduler is not None and scheduler.in_task() and not scheduler.dying()
        if connection is _monitor or not in_task:
            select.select([fd], [], [])
            continue
        assert scheduler is not None
        if _readable(fd, FAST_SECONDS):
            continue
        pid = connection.get_backend_pid()
        if _blocked(pid):
            counts["lock waits"] += 1
            scheduler.block(_still_waiting(fd, pid), pid)
        else:
            _readable(fd, FAST_SECONDS)


def _still_waiting(fd: int, pid: int) -> Callable[[], bool]:
    """Whether the blocked statement still waits for a lock, asked once the server has settled: a
    backend whose lock was just let go is neither answered nor waiting for a moment (it wakes, takes
    the row again, may wait on another transaction), and what the scheduler saw then depended on
    real time, not on the seed: it runs on until it answers or waits again."""

    def still_waiting() -> bool:
        while True:
            if _readable(fd):
                return False
            if _blocked(pid):
                return True
            _readable(fd, FAST_SECONDS)

    return still_waiting


def install(dsn: str) -> None:
    """Put this process's psycopg2 in green mode, with a connection to ask the server about locks
    (once per process; outside a simulated task every wait blocks as usual)."""
    global _monitor
    if _monitor is not None:
        return
    psycopg2.extensions.set_wait_callback(wait)
    _monitor = psycopg2.connect(dsn)
    _monitor.autocommit = True


def uninstall() -> None:
    """psycopg2 back in its usual blocking mode (the process goes on with other work)."""
    global _monitor
    if _monitor is None:
        return
    psycopg2.extensions.set_wait_callback(None)
    _monitor.close()
    _monitor = None


@contextmanager
def interleaving(scheduler: Scheduler) -> Iterator[None]:
    """Let ``scheduler`` interleave its tasks' statements while the block runs."""
    global _scheduler
    _scheduler = scheduler
    scheduler.deadlocked = deadlocked
    try:
        yield
    finally:
        _scheduler = None
