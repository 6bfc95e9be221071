"""Celery's workers as the queue of record meets them, modelled for the simulation.

A *node* (``celery -A worker.celery_app worker --concurrency C``) is a consumer that fetches
messages from the broker and C pool processes that run them, one at a time each. What the model
does, each rule checked against a real Celery worker on Redis by ``tests/test_celery_model.py`` (so
the model cannot drift from what runs in production):

- prefetch: a node fetches while it holds fewer than C × ``worker_prefetch_multiplier`` messages that
  are running or due; a countdown (ETA) message is fetched beyond that and held, unacknowledged,
  until it is due (one node may hold any number of them);
- acknowledgement: late (``task_acks_late``), after the run, whether it returned or raised;
- visibility timeout: a message unacknowledged for ``visibility_timeout`` goes back to the head of
  the queue (every live node runs Redis's ``restore_visible`` now and then), whether or not the node
  that holds it is still running it;
- soft time limit: ``SoftTimeLimitExceeded`` is raised in the run at ``soft_time_limit``;
- hard time limit: the pool process is killed at ``time_limit``; its message is acknowledged when
  ``task_acks_on_timeout`` is true, else requeued at once; a new pool process starts;
- a pool process that dies (``task_reject_on_worker_lost``): within MAINTAIN_SECONDS the node notices,
  requeues its message and starts a new pool process;
- a node that dies: its unacknowledged messages come back only through the visibility timeout.

The rules are read from the very configuration workers run with (``worker.celery_config``), so a
change there changes the model: the mutation ``time-limit-acknowledges`` is such a change.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from billiard.exceptions import SoftTimeLimitExceeded

from tests.simulation.scheduler import Scheduler, SimEvent, Task
from tests.simulation.world import Message, SimBroker
from worker.celery_config import make_celery, time_limits
from worker.settings import Settings

#: How often a live node puts back the messages whose visibility timeout passed: kombu's Redis
#: transport sweeps every ``unacked_restore_interval`` (10 s) × ``unacked_restore_throttle`` (10) seconds.
RESTORE_INTERVAL = 100.0
#: How soon a node notices a pool process that died (billiard's maintain_pool runs every 5 s, and
#: when a process exits), requeues its message and replaces it.
MAINTAIN_SECONDS = 5.0


@dataclass(frozen=True)
class CeleryRules:
    concurrency: int
    prefetch_multiplier: int
    acks_late: bool
    reject_on_worker_lost: bool
    acks_on_timeout: bool
    soft_time_limit: float
    time_limit: float
    visibility_timeout: float

    @classmethod
    def of(cls, settings: Settings, concurrency: int) -> CeleryRules:
        conf = make_celery(settings).conf
        acks_on_timeout = conf.task_acks_on_timeout
        if acks_on_timeout is None:
            acks_on_timeout = conf.task_acks_on_failure_or_timeout
        limits = time_limits(settings)
        return cls(
            concurrency=concurrency,
            prefetch_multiplier=conf.worker_prefetch_multiplier,
            acks_late=conf.task_acks_late,
            reject_on_worker_lost=bool(conf.task_reject_on_worker_lost),
            acks_on_timeout=bool(acks_on_timeout),
            soft_time_limit=limits["soft_time_limit"],
            time_limit=limits["time_limit"],
            visibility_timeout=float(conf.broker_transport_options["visibility_timeout"]),
        )

    @property
    def prefetch(self) -> int:
        return self.concurrency * self.prefetch_multiplier


@dataclass(eq=False)
class Child:
    """A pool process: the simulation's process that runs messages (its tasks die with it)."""

    process: object
    main: Task | None = None
    running: Message | None = None
    assigned: SimEvent | None = None
    started_at: float = 0.0


@dataclass(eq=False)
class Node:
    """One ``celery worker`` process tree: its consumer, its pool processes, the messages it holds."""

    name: str
    process: object  # the node's own process (its consumer and timers)
    rules: CeleryRules
    children: list[Child] = field(default_factory=list)
    held: list[Message] = field(default_factory=list)  # fetched, waiting for a pool process (or their ETA)
    alive: bool = True
    changed: SimEvent | None = None


@dataclass
class CeleryModel:
    """The nodes of a simulated fleet, over the simulated broker. ``start_child`` makes a pool
    process (the simulation's process, with its worker context and its window keeper) and returns
    it; ``run`` runs one message in the pool process that received it (the task's body)."""

    scheduler: Scheduler
    broker: SimBroker
    start_child: Callable[[Node, str], object]
    run: Callable[[object, Message], None]
    on_child_lost: Callable[[object, str], None]
    guard: Callable[[object, Callable[[], None], str], Callable[[], None]]
    nodes: list[Node] = field(default_factory=list)
    _numbers: itertools.count = field(default_factory=lambda: itertools.count(1))

    # -- nodes ------------------------------------------------------------------------------------

    def __post_init__(self) -> None:
        self.broker.on_message = self.message_arrived

    def start_node(self, name: str, rules: CeleryRules, process: object, delay: float = 0.0) -> Node:
        node = Node(name, process, rules, changed=SimEvent(self.scheduler))
        self.nodes.append(node)
        self.scheduler.spawn(
            self.guard(process, lambda: self._boot(node), f"{name} consumer"), f"{name}", process, delay
        )
        return node

    def _boot(self, node: Node) -> None:
        for _ in range(node.rules.concurrency):
            self._new_child(node)
        self._consume(node)

    def _new_child(self, node: Node) -> Child:
        number = next(self._numbers)
        process = self.start_child(node, f"{node.name}-{number}")
        child = Child(process, assigned=SimEvent(self.scheduler))
        child.main = self.scheduler.spawn(
            self.guard(process, lambda: self._serve(node, child), f"{node.name} pool process {number}"),
            f"{node.name}-{number}",
            process,
        )
        node.children.append(child)
        return child

    def kill_node(self, node: Node) -> None:
        """The whole node dies (SIGKILL, the machine lost): its messages stay unacknowledged in the
        broker until the visibility timeout."""
        node.alive = False
        for child in node.children:
            self.scheduler.kill(child.process)
            self.on_child_lost(child.process, "its node died")
        node.children.clear()
        node.held.clear()
        self.scheduler.kill(node.process)

    def kill_child(self, node: Node, child: Child, reason: str) -> None:
        """A pool process dies (a crash, or its hard time limit): its message is requeued at once
        (``task_reject_on_worker_lost``), or acknowledged at a hard time limit when the rules say so."""
        if child not in node.children:
            return
        node.children.remove(child)
        self.scheduler.kill(child.process)
        self.on_child_lost(child.process, reason)
        message = child.running
        if message is not None and node.alive and reason == "hard time limit":
            if node.rules.acks_on_timeout:
                self.broker.ack(message, fate="acknowledged at its hard time limit")
            else:
                message.requeued_at_time_limit = True
                self.broker.requeue(message)
        if node.alive:
            noticed = 0.0 if reason == "hard time limit" else self.scheduler.rng.uniform(0.0, MAINTAIN_SECONDS)
            self.scheduler.spawn(
                self.guard(node.process, lambda: self._replace(node, message), "replacing a pool process"),
                f"{node.name} replaces a pool process",
                node.process,
                delay=noticed,
            )

    def _replace(self, node: Node, message: Message | None) -> None:
        """The node noticed a pool process died: its message is requeued (worker lost), a new one starts."""
        if message is not None and message.holder is node and node.rules.reject_on_worker_lost:
            self.broker.requeue(message)
        self._new_child(node)
        assert node.changed is not None
        node.changed.set()

    def child_of(self, process: object) -> tuple[Node, Child] | None:
        for node in self.nodes:
            for child in node.children:
                if child.process is process:
                    return node, child
        return None

    # -- the consumer ------------------------------------------------------------------------------

    def _consume(self, node: Node) -> None:
        restored_at = self.scheduler.t
        assert node.changed is not None
        while node.alive:
            if self.scheduler.t >= restored_at + RESTORE_INTERVAL - 1e-6:
                self.broker.restore_visible()
                restored_at = self.scheduler.t
            self._fetch(node)
            self._dispatch(node)
            node.changed.clear()
            node.changed.wait(self._next_wake(node, restored_at))

    def _counted(self, node: Node) -> int:
        """Messages the node holds that count against its prefetch: running, or due."""
        running = sum(child.running is not None for child in node.children)
        return running + sum(message.eta <= self.scheduler.t for message in node.held)

    def _fetch(self, node: Node) -> None:
        while self._counted(node) < node.rules.prefetch:
            message = self.broker.fetch(node)
            if message is None:
                return
            node.held.append(message)

    def _dispatch(self, node: Node) -> None:
        free = [child for child in node.children if child.running is None and child.main is not None]
        due = sorted((m for m in node.held if m.eta <= self.scheduler.t), key=lambda m: m.delivered_at)
        for child, message in zip(free, due, strict=False):
            node.held.remove(message)
            child.running, child.started_at = message, self.scheduler.t
            self._time_limits(node, child, message)
            assert child.assigned is not None
            child.assigned.set()

    def _next_wake(self, node: Node, restored_at: float) -> float:
        """Until the next restore, a message due to become visible, or a held one due (a message
        sent, or a pool process freed, wakes the consumer sooner)."""
        now = self.scheduler.t
        moments = [restored_at + RESTORE_INTERVAL]
        visible = self.broker.next_visible()
        if visible is not None and visible > now:
            moments.append(visible)
        moments += [message.eta for message in node.held if message.eta > now]
        return max(1e-3, min(moments) - now)

    def message_arrived(self) -> None:
        """A message was sent or put back: every live consumer looks (Redis's BRPOP wakes at once)."""
        for node in self.nodes:
            if node.alive and node.changed is not None:
                node.changed.set()

    def _time_limits(self, node: Node, child: Child, message: Message) -> None:
        def limits() -> None:
            self.scheduler.sleep(node.rules.soft_time_limit)
            if child.running is message and child in node.children and child.main is not None:
                self.scheduler.interrupt(child.main, SoftTimeLimitExceeded())
            self.scheduler.sleep(node.rules.time_limit - node.rules.soft_time_limit)
            if child.running is message and child in node.children:
                self.kill_child(node, child, "hard time limit")

        self.scheduler.spawn(self.guard(node.process, limits, "time limits"), f"{node.name} limits", node.process)

    # -- a pool process -----------------------------------------------------------------------------

    def _serve(self, node: Node, child: Child) -> None:
        assert child.assigned is not None and node.changed is not None
        while True:
            child.assigned.wait()
            child.assigned.clear()
            message = child.running
            if message is None:
                continue
            try:
                self.run(child.process, message)  # reports what it raised itself; a crash goes on
            except SoftTimeLimitExceeded:  # it landed after the run's own handling: a failed run
                pass
            if child.running is message:
                child.running = None
                self.broker.ack(message)  # acks_late: after the run, whether it returned or failed
            node.changed.set()
