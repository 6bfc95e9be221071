"""A deterministic scheduler: simulated processes and their threads as greenlets on one thread, a fake clock.

Every task runs real code until it reaches a point where a real process would wait or where the
world may change under it: a call to S3 or the recognizer, a sleep (backoff, idle slot, lease
renewal), a wait on an event (a thread's work, a call coming back), right after a commit, and, on
PostgreSQL, before every statement (``tests/simulation/postgres.py``). There it hands control back,
and the scheduler picks the next task to run with its seeded random generator, so the schedule, not
the operating system, decides every interleaving, and a seed replays the same run. On PostgreSQL
the tasks' transactions interleave statement by statement on connections of their own: a statement
that waits for another's row lock leaves its task blocked until that lock is let go. On SQLite a
task never yields inside a transaction (its write lock would stop every other task's thread).

The clock only moves when the scheduler moves it: to the next task due, or by a jump that stands
for a stall of the whole machine or of one process (leases may run out meanwhile).
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import greenlet

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
NEVER = math.inf


class SimulatedCrash(BaseException):
    """The process dies here: nothing after this point in it runs (no ``except Exception`` catches it)."""


class OutOfTime(Exception):
    """The run went on past its time or step limit: something never finished."""


@dataclass(eq=False)
class Task:
    name: str
    process: object  # the simulated process it belongs to (its crash kills the task)
    glet: greenlet.greenlet
    wake: float = 0.0
    killed: bool = False
    done: bool = False
    #: Raised in the task at its next yield point (a signal: Celery's soft time limit).
    pending: BaseException | None = None
    #: While a database statement of the task waits for a lock: says whether it still does, and
    #: the server's process id of its connection.
    blocked: Callable[[], bool] | None = None
    blocked_pid: int = 0
    #: Until then the task's process is stopped (SIGSTOP): nothing wakes it before.
    stopped_until: float = 0.0


@dataclass
class Scheduler:
    rng: random.Random
    tasks: list[Task] = field(default_factory=list)
    t: float = 0.0
    steps: int = 0
    current: Task | None = None
    stall_probability: float = 0.0
    stall_seconds: tuple[float, float] = (0.0, 0.0)
    on_stall: Callable[[float], None] = lambda seconds: None
    #: Whether the given database processes (of blocked tasks) wait for each other in a cycle: the
    #: server then aborts one of them after its deadlock timeout, in real time; the schedule waits
    #: for that, so that where it happens does not depend on how fast the machine is.
    deadlocked: Callable[[list[int]], bool] = lambda pids: False
    _thread: int = field(default_factory=threading.get_ident)
    _main: greenlet.greenlet = field(default_factory=greenlet.getcurrent)

    # -- the clock celebscan reads (worker.clock.Clock) -------------------------------------------

    def now(self) -> datetime:
        return EPOCH + timedelta(seconds=self.t)

    def monotonic(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        if not self.in_task():
            self.t += max(0.0, seconds)
            return
        task = self.current
        assert task is not None
        task.wake = max(self.t + max(0.0, seconds), task.stopped_until)
        self._back_to_scheduler()

    def pause(self) -> None:
        """A point where others may run (no time passes for this task)."""
        if self.in_task():
            self.sleep(0.0)

    # -- tasks -------------------------------------------------------------------------------------

    def in_task(self) -> bool:
        return (
            self.current is not None
            and threading.get_ident() == self._thread
            and greenlet.getcurrent() is self.current.glet
        )

    def dying(self) -> bool:
        """Whether the running task's process was killed: it is unwinding, and must not wait again."""
        return self.in_task() and self.current is not None and self.current.killed

    def spawn(self, run: Callable[[], None], name: str, process: object, delay: float = 0.0) -> Task:
        task = Task(name, process, greenlet.greenlet(run, parent=self._main), wake=self.t + delay)
        self.tasks.append(task)
        return task

    def kill(self, process: object) -> None:
        """Every task of ``process`` dies at the point where it waits (the one running raises itself)."""
        for task in self.tasks:
            if task.process is process and task is not self.current:
                task.killed = True
                task.wake = min(task.wake, self.t)
                task.stopped_until = 0.0

    def interrupt(self, task: Task, exception: BaseException) -> None:
        """Raise ``exception`` in ``task`` where it waits next (at once if it sleeps now)."""
        task.pending = exception
        task.wake = max(min(task.wake, self.t), task.stopped_until)

    def stop(self, process: object, seconds: float) -> None:
        """SIGSTOP for ``seconds``: no task of ``process`` runs meanwhile (its leases may run out)."""
        until = self.t + seconds
        for task in self.tasks:
            if task.process is process:
                task.stopped_until = max(task.stopped_until, until)
                task.wake = max(task.wake, until)

    def wake(self, task: Task) -> None:
        task.wake = max(min(task.wake, self.t), task.stopped_until)

    def block(self, still_blocked: Callable[[], bool], pid: int = 0) -> None:
        """The running task's statement waits for a lock: it runs again once ``still_blocked`` says no."""
        task = self.current
        assert task is not None
        task.blocked, task.blocked_pid = still_blocked, pid
        task.wake = max(self.t, task.stopped_until)
        self._back_to_scheduler(deliver=False)

    def _back_to_scheduler(self, deliver: bool = True) -> None:
        self._main.switch()
        task = self.current
        if task is not None and task.killed:
            raise SimulatedCrash(f"{task.name}: its process died")
        if deliver and task is not None and task.pending is not None:
            pending, task.pending = task.pending, None
            raise pending

    def step(self) -> bool:
        """Run one task until it waits again; False when no task is left."""
        self.tasks = [task for task in self.tasks if not task.done]
        if not self.tasks:
            return False
        for task in self.tasks:
            if task.blocked is not None and (task.killed or not task.blocked()):
                task.blocked = None
        blocked = [task.blocked_pid for task in self.tasks if task.blocked is not None]
        if blocked and self.deadlocked(blocked):  # the server will abort one of them: wait for it
            time.sleep(0.005)
            return True
        runnable = [task for task in self.tasks if task.blocked is None]
        if not runnable:  # every task waits for a lock: the database resolves it (a deadlock)
            time.sleep(0.005)
            return True
        ready = [task for task in runnable if task.wake <= self.t]
        if not ready:
            soonest = min(task.wake for task in runnable)
            if soonest == NEVER:
                if len(runnable) < len(self.tasks):  # the others wait for a lock
                    time.sleep(0.005)
                    return True
                raise OutOfTime(f"every task waits for an event nobody will set: {[t.name for t in runnable]}")
            self.t = soonest
            ready = [task for task in runnable if task.wake <= self.t]
        if self.stall_probability and self.rng.random() < self.stall_probability:
            seconds = self.rng.uniform(*self.stall_seconds)
            self.t += seconds  # the whole machine stalls: every lease keeps running out meanwhile
            self.on_stall(seconds)
        task = self.rng.choice(ready)
        self.current = task
        self.steps += 1
        if task.killed and not task.glet:  # killed before it started: it never runs
            task.done = True
            return True
        try:
            task.glet.switch()  # a killed task raises SimulatedCrash where it waits, and unwinds
        finally:
            self.current = None
        if task.glet.dead:
            task.done = True
        return True

    def run_until(self, done: Callable[[], bool], *, seconds: float, max_steps: int) -> None:
        limit_t, limit_steps = self.t + seconds, self.steps + max_steps
        while not done():
            if self.t > limit_t or self.steps > limit_steps:
                raise OutOfTime(f"not done after {self.t:.0f} simulated seconds and {self.steps} steps")
            if not self.step():
                return


class SimEvent:
    """``threading.Event`` on the scheduler's clock: a task that waits on it yields until it is set."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self._flag = False
        self._waiting: list[Task] = []

    def set(self) -> None:
        self._flag = True
        for task in self._waiting:
            self.scheduler.wake(task)
        self._waiting.clear()

    def clear(self) -> None:
        self._flag = False

    def is_set(self) -> bool:
        return self._flag

    def wait(self, timeout: float | None = None) -> bool:
        if self._flag:
            return True
        if not self.scheduler.in_task():
            raise RuntimeError("only a simulated task can wait on a simulated event")
        task = self.scheduler.current
        assert task is not None
        self._waiting.append(task)
        try:
            self.scheduler.sleep(NEVER if timeout is None else timeout)
        finally:
            if task in self._waiting:
                self._waiting.remove(task)
        return self._flag


@dataclass(eq=False)
class SimThread:
    task: Task
    finished: SimEvent

    def join(self, timeout: float | None = None) -> None:
        self.finished.wait(timeout)

    def is_alive(self) -> bool:
        return not self.finished.is_set()


class SimThreads:
    """``worker.threads.Threads`` for the simulation: a thread is a task of the process that starts
    it (its process's crash kills it); ``guard`` wraps its body as every task's is."""

    def __init__(self, scheduler: Scheduler, guard: Callable[[object, Callable[[], None], str], Callable[[], None]]):
        self.scheduler, self.guard = scheduler, guard

    def start(self, target: Callable[[], object], name: str) -> SimThread:
        process = self.scheduler.current.process if self.scheduler.in_task() and self.scheduler.current else None
        finished = SimEvent(self.scheduler)

        def body() -> None:
            try:
                target()
            finally:
                finished.set()

        task = self.scheduler.spawn(self.guard(process, body, name), name, process)
        return SimThread(task, finished)

    def event(self) -> SimEvent:
        return SimEvent(self.scheduler)
