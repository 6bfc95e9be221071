"""A deterministic scheduler: simulated processes as greenlets on one thread, a fake clock.

Every task runs real code until it reaches a point where a real process would wait or where the
world may change under it: a call to S3 or the recognizer, a sleep (backoff, idle slot, lease
renewal), or right after a commit. There it hands control back, and the scheduler picks the next
task to run with its seeded random generator. Transactions never overlap (a task never yields
inside one), so the schedule, not the operating system, decides every interleaving, and a seed
replays the same run. The clock only moves when the scheduler moves it: to the next task due, or
by a jump that stands for a stall of the whole machine (leases may run out meanwhile).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import greenlet

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


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
        task.wake = self.t + max(0.0, seconds)
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

    def spawn(self, run: Callable[[], None], name: str, process: object, delay: float = 0.0) -> Task:
        task = Task(name, process, greenlet.greenlet(run, parent=self._main), wake=self.t + delay)
        self.tasks.append(task)
        return task

    def kill(self, process: object) -> None:
        """Every task of ``process`` dies at the point where it waits (the one running raises itself)."""
        for task in self.tasks:
            if task.process is process and task is not self.current:
                task.killed = True

    def _back_to_scheduler(self) -> None:
        self._main.switch()
        if self.current is not None and self.current.killed:
            raise SimulatedCrash(f"{self.current.name}: its process died")

    def step(self) -> bool:
        """Run one task until it waits again; False when no task is left."""
        self.tasks = [task for task in self.tasks if not task.done]
        if not self.tasks:
            return False
        ready = [task for task in self.tasks if task.wake <= self.t]
        if not ready:
            self.t = min(task.wake for task in self.tasks)
            ready = [task for task in self.tasks if task.wake <= self.t]
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
