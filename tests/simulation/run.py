"""One seeded run of the simulation: celebscan's real claim, listing, batch, window and write code,
on Celery as modelled (``celery_model.py``), under a seeded schedule of faults; then a quiet end in
which nobody helps (no ``scan --resume``), and the invariants checked (``checker.py``).

What a run does, every choice drawn from its seed:
- a bucket of a few dozen objects: pictures under several keys each (copies), a picture that
  kills whichever worker recognizes it, objects that are not images, multipart ETags;
- one to three worker nodes of one or two pool processes each, as the Procfile starts them: each
  pool process runs the production call path (window slots taken and sent on, calls in flight on
  lanes, a listing helper, the lease keeper, the window's keeper), on threads the scheduler runs;
- a user who scans the bucket, starts an overlapping scan (maybe ``--force`` or ``--max-cost``),
  resumes scans while workers run, and changes the bucket while it is listed;
- faults: a crash before and after commits (every transaction is a candidate), acknowledgements of
  commits lost, S3 and the recognizer throttling, failing and going slow for a spell (runs then hit
  their soft and hard time limits), messages lost, duplicated, delayed and reordered, Redis
  restarted empty, a node killed (its messages come back only after the visibility timeout) or
  stopped past its leases (SIGSTOP), and the whole machine stalling;
- then the faults stop, and the run ends when every scan has finished by itself; only a scan whose
  ``--max-cost`` budget is spent is resumed by the user, as it must be.

On PostgreSQL every task holds connections of its own and the tasks' transactions interleave
statement by statement (``postgres.py``); on SQLite a transaction is never interrupted.
"""

from __future__ import annotations

import itertools
import logging
import random
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from billiard.exceptions import SoftTimeLimitExceeded
from sqlalchemy import Engine, create_engine, event, select, text
from sqlalchemy.exc import SQLAlchemyError

from producer.enqueue import hand_to_workers
from producer.scan import ScanRequest, Services, run_scan
from tests.simulation import checker, mutations, postgres
from tests.simulation.celery_model import CeleryModel, CeleryRules, Node
from tests.simulation.scheduler import OutOfTime, Scheduler, SimThreads, SimulatedCrash
from tests.simulation.world import (
    BUCKET,
    NOT_AN_IMAGE,
    Bucket,
    Calls,
    Faults,
    Message,
    SimBroker,
    SimRecognizer,
    SimS3,
    SimWindowBroker,
    md5,
    picture_bytes,
)
from worker import clock, threads
from worker.batch import WorkerContext, run_of
from worker.database import _engine_options, connect, with_driver
from worker.keeper import WindowKeeper, keep_the_window_in_a_thread
from worker.media.images import ImageLimits
from worker.queue import leases
from worker.queue.images import ImageQueue
from worker.queue.slots import SlotMessage, WindowSlots
from worker.recognizers import Recognizers
from worker.schema import images, metadata, pictures, scans
from worker.settings import Settings
from worker.sources import S3Reader
from worker.store import ResultStore
from worker.tasks import run_listing_part, run_window_slot

log = logging.getLogger(__name__)

SOURCE = f"s3://{BUCKET}/"
#: Simulated seconds of chaos before the faults stop; and how long after that every scan must
#: have finished by itself (the longest a deferred image waits, plus leases, plus the keeper's).
CHAOS_SECONDS = 100.0
QUIET_SECONDS = 900.0
MAX_STEPS = 60_000


@dataclass
class RunResult:
    seed: int
    database: str
    violations: list[str]
    stats: Counter = field(default_factory=Counter)
    worst_excess: int = 0  # the most paid calls of one picture beyond its allowance
    bound: str = ""

    @property
    def ok(self) -> bool:
        return not self.violations

    def replay_command(self) -> str:
        return f"python -m bench.simulate --seed {self.seed} --database {self.database}"


@dataclass(eq=False)
class Process:
    """A simulated OS process: a pool process of a node, a node itself, or a ``celebscan`` command;
    its tasks, and the paid calls it made that no write of it has recorded yet."""

    name: str
    engine: Engine
    outstanding: Counter = field(default_factory=Counter)  # pictures called for, not yet written
    alive: bool = True
    token: str = ""  # the run it works on now
    run_started: float = 0.0
    stopped: list[tuple[float, float]] = field(default_factory=list)  # (from, until): SIGSTOP


class Simulation:
    def __init__(self, seed: int, engine: Engine, database: str, mutation: str | None = None) -> None:
        self.seed, self.engine, self.database, self.mutation = seed, engine, database, mutation
        database_url = engine.url.render_as_string(hide_password=False)
        self.rng = random.Random(seed)
        self.scheduler = Scheduler(random.Random(self.rng.random()))
        self.lease = self.rng.choice([20.0, 40.0])
        self.visibility = self.rng.choice([60.0, 120.0])
        self.faults = _draw_faults(self.rng, self.lease, self.visibility)
        self.scheduler.stall_probability = self.rng.choice([0.0, 0.0, 0.0003, 0.001])  # per scheduler step
        self.scheduler.stall_seconds = (self.lease * 0.5, self.lease * 2.5)
        self.scheduler.on_stall = self._stalled
        self.bucket = Bucket()
        self.poison: set[str] = set()
        self.pictures = self._fill_bucket()
        self.s3 = SimS3(
            self.bucket, self.scheduler, random.Random(self.rng.random()), self.faults, self.rng.choice([4, 7, 50])
        )
        self.calls = Calls()
        self.interruptions: Counter = Counter()  # by picture: crashes and stalls between a call and its write
        self.broker = SimBroker(self.scheduler, random.Random(self.rng.random()), self.faults, self.visibility)
        self.window_broker = SimWindowBroker(self.broker)
        self.stats: Counter = Counter()
        self.errors: list[str] = []
        self.dead_runs: set[str] = set()  # the runs of processes that died: their claims lapse
        self.long_stalls: list[float] = []  # when the whole machine stalled longer than most of a lease
        self.unrenewed: set[str] = set()  # runs whose lease keeper failed a renewal
        self.repairs: list[tuple[str, SlotMessage]] = []  # window slots the keeper sent again, and why
        self.lost_processes: dict[str, str] = {}  # process name -> why it died
        self.broker_peak: Counter = Counter()  # by scan: the most slot messages in the broker at once
        self.superseded: dict[int, Message] = {}  # slot messages seen superseded (see _note_broker_size)
        self.finished = False
        self.landed_calls = 0
        self._runs = itertools.count(1)
        self.settings = Settings(
            database_url=database_url,
            broker_url="redis://simulated-broker",
            backend="rekognition",
            batch_size=self.rng.choice([2, 4, 8]),
            window=self.rng.choice([1, 2, 3]),
            listing_parts=self.rng.choice([2, 4]),
            max_attempts=2,
            lease_seconds=self.lease,
            visibility_timeout=int(self.visibility),
            retry_deadline=3600,
            calls_in_flight=self.rng.choice([1, 1, 2, 4]),
        )
        self.rules = CeleryRules.of(self.settings, concurrency=self.rng.choice([1, 2]))
        self.celery = CeleryModel(
            self.scheduler,
            self.broker,
            start_child=self._start_pool_process,
            run=self._run_message,
            on_child_lost=self._process_lost,
            guard=self.guarded,
        )
        self.contexts: dict[int, WorkerContext] = {}
        self.node_faults = self.rng.choice([0.0, 1.0, 2.0])  # how often a node is killed or stopped
        self.run_stops = self.rng.choice([1.0, 3.0, 6.0])  # how often a run is stopped for about its lease
        self.closing = False
        self.pool_processes = 0
        self.disruptions: Counter = Counter()  # by image: faults that cut a run that had started it
        self.runs_by_token: dict[str, Process] = {}  # each run of a message, and the process running it

    # -- the world -------------------------------------------------------------------------------

    def _fill_bucket(self) -> dict[str, int]:
        """Pictures under one to four keys each (``2024/``, ``backup/2024/``, ``shared/alice/``...),
        a poison picture sometimes, a few objects that are not images, some multipart uploads."""
        folders = ["2024/", "backup/2024/", "shared/alice/", "shared/bob/"]
        count = self.rng.randint(3, 7)
        numbers = self.rng.sample(range(1, 10_000), count)
        pictures = {}
        for number in numbers:
            data = picture_bytes(number)
            pictures[md5(data)] = number
            for folder in self.rng.sample(folders, self.rng.randint(1, 4)):
                self.bucket.put(f"{folder}{number:05d}.png", data, multipart=self.rng.random() < 0.15)
        if self.rng.random() < 0.3:
            self.poison.add(md5(picture_bytes(numbers[0])))
        for n in range(self.rng.randint(0, 2)):
            self.bucket.put(f"2024/notes-{n}.jpg", NOT_AN_IMAGE)
        return pictures

    def _mutate_bucket(self) -> None:
        """An upload, an overwrite with new bytes, or a deletion, while scans list and work."""
        keys = sorted(self.bucket.objects)
        action = self.rng.choice(["add", "overwrite", "delete"])
        number = self.rng.randint(10_001, 20_000)
        if action == "add" or not keys:
            self.bucket.put(f"new/{number:05d}.png", picture_bytes(number), change=True)
        elif action == "overwrite":
            self.bucket.put(self.rng.choice(keys), picture_bytes(number), change=True)
        else:
            self.bucket.delete(self.rng.choice(keys))
        self.stats[f"bucket {action}"] += 1

    # -- processes -------------------------------------------------------------------------------

    def new_process(self, name: str) -> Process:
        """A process of its own, sharing the run's engine (its pool and compiled statements); every
        task checks out connections of its own."""
        return Process(name, self.engine)

    def guarded(self, process: object, body: Callable[[], None], what: str) -> Callable[[], None]:
        """A task's body: a crash kills its process (the other tasks, the message it held); any
        other error escaping celebscan's code is a violation."""

        def run() -> None:
            try:
                body()
            except SimulatedCrash:
                if isinstance(process, Process) and not self.closing:
                    self.crash(process)
            except OutOfTime:
                raise
            except Exception as exc:  # the real code let an error out of a task: that is a finding
                log.exception("%s raised", what)
                self.errors.append(f"{what} raised {type(exc).__name__}: {exc}")

        return run

    def crash(self, process: Process) -> None:
        """The process dies where it is: a pool process's node requeues its message and replaces
        it; a node's death leaves its messages to the visibility timeout."""
        if not process.alive:
            return
        found = self.celery.child_of(process)
        if found is not None:
            self.celery.kill_child(*found, "crashed")
            return
        for node in self.celery.nodes:
            if node.process is process and node.alive:
                self._kill_node(node)
                return
        self._process_lost(process, "crashed")
        self.scheduler.kill(process)

    def _process_lost(self, process: object, reason: str) -> None:
        assert isinstance(process, Process)
        if not process.alive:
            return
        process.alive = False
        self.dead_runs.add(process.token)
        self.lost_processes[process.name] = reason
        self.stats[f"processes lost: {reason}"] += 1
        log.info(
            "t=%.1f %s: %s in run %s, calls not written: %s",
            self.scheduler.t,
            process.name,
            reason,
            process.token,
            dict(process.outstanding),
        )
        self.interruptions.update(process.outstanding)
        process.outstanding.clear()
        if reason != "hard time limit" and process.token:  # slowness is not a fault of the images
            self._disrupted(started_by_run(process.token))

    def _kill_node(self, node: Node) -> None:
        self.celery.kill_node(node)
        assert isinstance(node.process, Process)
        self._process_lost(node.process, "its node died")
        self.stats["nodes killed"] += 1
        self._start_node(f"{node.name}+", delay=self.rng.uniform(5.0, 30.0))  # systemd starts it again

    def _stalled(self, seconds: float) -> None:
        """The machine stalled: leases may run out. A picture a run was calling for may be taken over
        by a run with a copy of it, which calls too (the first run's write is not refused: it
        still holds its image)."""
        if seconds < self.lease * 3 / 4:  # a keeper renews every quarter lease: a shorter stall loses nothing
            self.stats["stalls"] += 1
            return
        self.stats["stalls that may cost a lease"] += 1
        self.long_stalls.append(self.scheduler.t)
        self._pictures_held_may_be_paid_again()

    def _pictures_held_may_be_paid_again(self) -> None:
        """A stall past a lease: every picture being called for may be paid again, and every image
        started may see its start count as a run that never ended."""
        with self.engine.connect() as conn:
            for (picture,) in conn.execute(select(pictures.c.content_hash)):
                self.interruptions[picture] += 1
        self._disrupted(images.c.started_by.is_not(None))

    def _disrupted(self, started) -> None:
        """The images ``started`` (queued) lost their run to a fault: each such start may count
        toward quarantine."""
        with self.engine.connect() as conn:
            for (image_id,) in conn.execute(select(images.c.id).where(images.c.status == "queued", started)):
                self.disruptions[image_id] += 1

    def _stop_node(self, node: Node, seconds: float) -> None:
        """SIGSTOP of a node and its pool processes (a machine that froze, a debugger)."""
        self.stats["nodes stopped"] += 1
        for process in [node.process, *(child.process for child in node.children)]:
            assert isinstance(process, Process)
            process.stopped.append((self.scheduler.t, self.scheduler.t + seconds))
            self.scheduler.stop(process, seconds)
        if seconds >= self.lease * 3 / 4:
            self._pictures_held_may_be_paid_again()

    def may_have_lost_its_leases(self, process: Process | None, token: str) -> bool:
        """A run's claims can lapse only if the machine or its process stalled during the run for
        longer than most of a lease, or its lease keeper failed to renew them."""
        started = process.run_started if process is not None else 0.0
        stopped = process is not None and any(
            until - start >= self.lease * 3 / 4 and until >= started for start, until in process.stopped
        )
        return token in self.unrenewed or stopped or any(moment >= started for moment in self.long_stalls)

    def current_process(self) -> Process | None:
        task = self.scheduler.current
        return task.process if task is not None and isinstance(task.process, Process) else None

    # -- the fleet -------------------------------------------------------------------------------

    def _start_node(self, name: str, delay: float = 0.0) -> Node:
        return self.celery.start_node(name, self.rules, self.new_process(name), delay)

    def _start_pool_process(self, node: Node, name: str) -> Process:
        """A pool process: its worker context and, as at worker_process_init, its window keeper."""
        self.pool_processes += 1
        process = self.new_process(name)
        self.contexts[id(process)] = self.worker_context(process)
        keeper = WindowKeeper(process.engine, self.window_broker, self.lease, name=name)
        self.scheduler.spawn(
            self.guarded(process, lambda: keep_the_window_in_a_thread(keeper), f"{name} init"), f"{name} init", process
        )
        return process

    def worker_context(self, process: Process) -> WorkerContext:
        recognizer = SimRecognizer(
            self.scheduler, random.Random(self.rng.random()), self.faults, self.calls, self._called, self.poison
        )
        return WorkerContext(
            store=ResultStore(process.engine, self.lease),
            readers={"s3": S3Reader(self.s3, max_bytes=10**8)},
            recognizers=Recognizers.of(recognizer),
            limits=ImageLimits(),
            max_attempts=self.settings.max_attempts,
            retry_base_seconds=0.5,
            retry_deadline=self.settings.retry_deadline,
            batch_size=self.settings.batch_size,
            lease_seconds=self.lease,
            batch_seconds=self.settings.run_seconds,
            calls_in_flight=self.settings.calls_in_flight,
            refill_inline=True,  # a run of one lane claims its scan's next batches too, as a fleet's do
            refill_seconds=20.0,
            settings=self.settings,
            _s3_lister=self.s3,
        )

    def _called(self, picture: str, key: str) -> None:
        process = self.current_process()
        log.info(
            "t=%.1f paid call for picture %s (%s) by %s", self.scheduler.t, picture[:8], key, process and process.token
        )
        if process is not None:
            process.outstanding[picture] += 1

    def _run_message(self, process: object, message: Message) -> None:
        """What Celery's task does with a message, in the pool process that received it."""
        assert isinstance(process, Process)
        context = self.contexts[id(process)]
        token = f"{message.id}:r{next(self._runs)}"
        process.token, process.run_started = token, self.scheduler.t
        self.runs_by_token[token] = process
        self.stats[f"{message.kind} runs"] += 1
        try:
            if message.kind == "slot":
                run_window_slot(SlotMessage(*message.args), context, token, self.window_broker.send)
            else:
                (part_id,) = message.args
                run_listing_part(
                    part_id,
                    context,
                    token,
                    lambda part, countdown: self.broker.send("list", (part,), countdown),
                    s3_client=self.s3,
                )
        except (SimulatedCrash, SoftTimeLimitExceeded):
            raise
        except Exception as exc:  # a task that raised: Celery would log it and acknowledge its message
            log.exception("the %s message %s raised", message.kind, message.id)
            self.errors.append(f"a {message.kind} message raised {type(exc).__name__}: {exc}")
        self._note_broker_size()

    def _note_broker_size(self) -> None:
        """The most slot messages of each scan in the broker at once, apart from those superseded:
        a slot's older generation back in the queue after a newer one was sent (the message of a
        run killed, stalled or cut short, redelivered; it does nothing when it comes). The checker
        asks each of those for the fault that brought it back."""
        generations: dict[tuple[int, int], list[tuple[int, Message]]] = {}
        for each in self.broker.queue + self.broker.unacked:
            if each.kind == "slot":
                scan_id, slot, generation = (int(part) for part in each.id.rsplit("-", 3)[1:])
                generations.setdefault((scan_id, slot), []).append((generation, each))
        held: Counter = Counter()
        for (scan_id, _), messages in generations.items():
            newest = max(generation for generation, _ in messages)
            for generation, message in messages:
                if generation < newest and message.holder is None:
                    self.superseded[id(message)] = message
                else:
                    held[scan_id] += 1
        for scan_id, count in held.items():
            self.broker_peak[scan_id] = max(self.broker_peak[scan_id], count)

    # -- the user ----------------------------------------------------------------------------------

    def services(self, process: Process) -> Services:
        def open_window(scan_id: int, part_ids) -> None:
            def send_parts(parts: list[int]) -> None:
                for part_id in parts:
                    self.broker.send("list", (part_id,))

            hand_to_workers(
                process.engine,
                self.lease,
                scan_id,
                list(part_ids),
                self.settings.window,
                send_parts,
                self.window_broker,
            )

        return Services(s3=lambda: self.s3, open_window=open_window, check_broker=lambda: None)

    def as_user(self, name: str, request: ScanRequest) -> bool:
        """One ``celebscan scan`` command, in a producer process of its own (which may crash);
        returns whether it ended well."""
        process = self.new_process(f"producer {name}")
        try:
            run_scan(
                ResultStore(process.engine, self.lease),
                self.settings,
                request,
                say=lambda line: None,
                services=self.services(process),
            )
            self.stats[f"user {name}"] += 1
            return True
        except SimulatedCrash:
            self._process_lost(process, "crashed")
            self.stats["producer crashed"] += 1
        except Exception as exc:  # a command that fails tells the user (a lost acknowledgement, say)
            self.stats[f"user {name} failed: {type(exc).__name__}"] += 1
        finally:
            process.alive = False
        return False

    def _chaos(self) -> None:
        force = self.rng.random() < 0.2
        while not self.as_user("scan", ScanRequest(SOURCE, force=force)):  # as a user would, when it failed
            self.scheduler.sleep(self.rng.uniform(1.0, 10.0))
        while True:
            self.scheduler.sleep(self.rng.uniform(5.0, 40.0))
            if self.scheduler.t >= CHAOS_SECONDS:
                break
            action = self.rng.choices(
                ["overlap", "resume", "mutate", "broker lost", "node killed", "node stopped", "run stopped", "nothing"],
                [
                    3,
                    1.5,
                    2,
                    0.3,
                    *(self.faults_weight(kind) for kind in ("node killed", "node stopped", "run stopped")),
                    2,
                ],
            )[0]
            if action == "overlap":
                force = self.rng.random() < 0.25
                max_cost = self.rng.choice([None, None, 0.004])
                self.as_user("overlapping scan", ScanRequest(SOURCE, force=force, max_cost=max_cost))
            elif action == "resume":
                scan_id = self.rng.randint(1, self._latest_scan() or 1)
                self.as_user("resume", ScanRequest(resume_id=scan_id))
            elif action == "mutate":
                self._mutate_bucket()
            elif action == "broker lost":
                self.broker.flush()
                self.stats["broker restarted empty"] += 1
            elif action == "node killed" and (alive := [n for n in self.celery.nodes if n.alive]):
                self._kill_node(self.rng.choice(alive))
            elif action == "node stopped" and (alive := [n for n in self.celery.nodes if n.alive]):
                working = [n for n in alive if any(child.running for child in n.children)]  # stopped mid-run
                self._stop_node(self.rng.choice(working or alive), self.rng.uniform(0.5, 2.5) * self.lease)
            elif action == "run stopped" and (running := self._running_children()):
                self._stop_run(self.rng.choice(running), self.rng.uniform(0.9, 1.4) * self.lease)

    def faults_weight(self, kind: str) -> float:
        if kind == "run stopped":
            return self.run_stops
        return self.node_faults if kind in ("node killed", "node stopped") else 0.0

    def _running_children(self) -> list[Process]:
        return [
            child.process
            for node in self.celery.nodes
            if node.alive
            for child in node.children
            if child.running is not None and isinstance(child.process, Process)
        ]

    def _stop_run(self, process: Process, seconds: float) -> None:
        """SIGSTOP of one pool process in the middle of a run, for about its lease: it wakes just
        as another run may have taken its images over, and writes late."""
        self.stats["runs stopped"] += 1
        process.stopped.append((self.scheduler.t, self.scheduler.t + seconds))
        self.scheduler.stop(process, seconds)
        if seconds >= self.lease * 3 / 4:
            self._pictures_held_may_be_paid_again()

    def _quiet_end(self) -> None:
        """The faults stop; nobody helps: the user only resumes a scan whose --max-cost budget is
        spent (each part of a budget is the user's call), and waits for every scan to finish."""
        while True:
            self.scheduler.sleep(30.0)
            unfinished = self._unfinished()
            if not unfinished:
                self.finished = True
                return
            for scan_id, budget, handed_out in unfinished:
                if budget is not None and handed_out >= budget:
                    self.as_user("more budget", ScanRequest(resume_id=scan_id))

    def _latest_scan(self) -> int | None:
        with self.engine.connect() as conn:
            return conn.execute(text("SELECT max(id) FROM scans")).scalar()

    def _unfinished(self) -> list[tuple[int, int | None, int]]:
        with self.engine.connect() as conn:
            return [
                (row.id, row.budget_images, row.handed_out)
                for row in conn.execute(
                    select(scans.c.id, scans.c.budget_images, scans.c.handed_out).where(scans.c.finished_at.is_(None))
                )
            ]

    # -- the run ----------------------------------------------------------------------------------

    def run(self) -> RunResult:
        random.seed(self.rng.random())  # celebscan's own jitter (backoff, resend delays, run tokens)
        self.commit_faults = random.Random(self.rng.random())
        result = RunResult(self.seed, self.database, [], self.stats)
        with ExitStack() as stack:
            stack.enter_context(clock.using(self.scheduler))
            stack.enter_context(threads.using(SimThreads(self.scheduler, self.guarded)))
            stack.enter_context(mutations.applied(self.mutation))
            stack.enter_context(_watching(self))
            if self.database == "postgresql":
                stack.enter_context(postgres.interleaving(self.scheduler))
            self.rules = CeleryRules.of(self.settings, self.rules.concurrency)  # as the mutation left them
            for number in range(self.rng.choice([1, 2, 3])):
                self._start_node(f"worker-{number + 1}")
            user = self.new_process("user")
            chaos = self.scheduler.spawn(self.guarded(user, self._chaos, "the user"), "user", user)
            try:
                self.scheduler.run_until(lambda: chaos.done, seconds=CHAOS_SECONDS * 4, max_steps=MAX_STEPS)
                self.faults.active = False
                self.scheduler.stall_probability = 0.0
                self.stats["steps of chaos"] = self.scheduler.steps
                quiet = self.new_process("quiet user")
                self.scheduler.spawn(self.guarded(quiet, self._quiet_end, "the user at the end"), "quiet user", quiet)
                self.scheduler.run_until(lambda: self.finished, seconds=QUIET_SECONDS, max_steps=MAX_STEPS)
            except OutOfTime as exc:
                result.violations.append(
                    f"liveness: {exc} after the faults stopped, nobody resuming; unfinished: {self._unfinished()}"
                )
            finally:
                self._stop_every_task()
            result.violations += [f"error: {error}" for error in self.errors]
            if not result.violations or self.finished:
                checker.check(self, result)
        self.stats["steps"] = self.scheduler.steps
        self.stats["simulated seconds"] = round(self.scheduler.t)
        self.stats["paid calls"] = self.calls.made
        self.stats["messages lost"] = self.broker.lost
        self.stats["messages duplicated"] = self.broker.duplicated
        self.stats["slots repaired"] = len(self.repairs)
        if self.database == "postgresql":
            self.stats.update(postgres.counts)
            postgres.counts.update(dict.fromkeys(postgres.counts, 0))
        return result

    def _stop_every_task(self) -> None:
        """Every task dies where it waits, and unwinds (its transactions roll back, its connections
        go back to the pool): nothing is left for the next seed."""
        self.closing = True
        self.scheduler.stall_probability = 0.0
        for node in self.celery.nodes:
            node.alive = False
        for _ in range(100_000):
            for task in self.scheduler.tasks:
                if isinstance(task.process, Process):
                    task.process.alive = False
                task.killed, task.stopped_until = True, 0.0
                task.wake = min(task.wake, self.scheduler.t)
            if not self.scheduler.step():
                return


def started_by_run(token: str):
    """Images the run ``token`` started (under its own token, or one of its batches')."""
    return (images.c.started_by == token) | images.c.started_by.like(f"{token}/%")


def _draw_faults(rng: random.Random, lease: float, visibility: float) -> Faults:
    """Each kind of fault at a level of its own, so that a seed may have slow calls and stopped
    nodes without crashes to hide what they do."""
    crashes, messages, throttling, slowness = (rng.choice([0.0, 0.25, 0.5, 1.0]) for _ in range(4))
    spells = []
    if rng.random() < slowness:  # calls longer than a lease, some past the runs' time limits
        start = rng.uniform(0.0, 20.0)
        spells.append((start, start + rng.uniform(20.0, 60.0)))
    return Faults(
        slow_spells=spells,
        slow_call=(lease * 0.5, visibility * 1.1),
        crash_before_commit=0.01 * crashes,
        crash_after_commit=0.01 * crashes,
        lost_ack=0.01 * crashes,
        s3_throttle=0.05 * throttling,
        recognizer_throttle=0.08 * throttling,
        recognizer_5xx=0.04 * throttling,
        duplicate=0.03 * messages,
        loss=0.02 * messages,
    )


T = TypeVar("T")


@contextmanager
def _watching(sim: Simulation) -> Iterator[None]:
    """What the checker needs to know as it happens: each write's paid calls that reached the
    database (and the calls a process made that its write recorded), each window slot the keeper
    sent again, each renewal that failed."""
    write, claim, release = ImageQueue.write, ImageQueue.claim, ImageQueue.release
    repair_lapsed, repair_lost = WindowSlots.repair_lapsed, WindowSlots.repair_lost
    renew_all = leases.renew_all
    letting_go: Counter[str] = Counter()  # tokens writing or releasing what they hold right now
    let_go_at: dict[str, float] = {}  # when each token last began or ended letting go of images

    def letting(tokens: tuple[str, ...], give_back: Callable[[], T]) -> T:
        for each in tokens:
            letting_go[each] += 1
            let_go_at[each] = sim.scheduler.t
        try:
            return give_back()
        finally:
            letting_go.subtract(tokens)
            let_go_at.update(dict.fromkeys(tokens, sim.scheduler.t))

    def watched_claim(self, scan_id, default_limit, token, sharers=1):
        """A claim never takes an image from a run that is alive and kept its leases. On PostgreSQL
        the holders read first may let go before the claim (a write or release between the two
        statements): those are not taken from."""
        looked_at = sim.scheduler.t
        with self.engine.connect() as conn:
            holders = dict(
                conn.execute(
                    select(images.c.id, images.c.claimed_by).where(
                        images.c.scan_id == scan_id, images.c.status == "queued", images.c.claimed_by.is_not(None)
                    )
                ).all()
            )
        claimed = claim(self, scan_id, default_limit, token, sharers)
        for image_id in claimed:
            holder = holders.get(image_id)
            if holder is None or run_of(holder) == run_of(token):
                continue
            if letting_go[holder] or let_go_at.get(holder, -1.0) >= looked_at:
                continue
            process = sim.runs_by_token.get(run_of(holder))
            live = process is not None and process.alive and process.token == run_of(holder)
            renewed_until = process.run_started + 2 * sim.settings.run_seconds if process is not None else 0.0
            if live and sim.scheduler.t < renewed_until and not sim.may_have_lost_its_leases(process, holder):
                sim.errors.append(f"run {token} took image {image_id} from run {holder}, alive with its leases held")
        return claimed

    def released(self, *tokens):
        return letting(tokens, lambda: release(self, *tokens))

    def counted(self, token, outcomes):
        written = letting((token,), lambda: write(self, token, outcomes))
        landed = written.written | written.refused | written.replayed
        sim.landed_calls += sum(o.paid_calls for o in outcomes if o.image_id in landed)
        process = sim.current_process()
        if written.refused and not sim.may_have_lost_its_leases(process, token):
            sim.errors.append(f"run {token} had its write of {sorted(written.refused)} refused, yet its leases held")
        for outcome in outcomes:  # a run that lost its claim paid for a call another run makes again
            if outcome.image_id in written.refused and outcome.paid_calls and outcome.content_hash:
                sim.interruptions[outcome.content_hash] += 1
        sim.stats["writes refused"] += len(written.refused)
        sim.stats["writes replayed"] += len(written.replayed)
        if process is not None:
            for outcome in outcomes:
                if outcome.image_id in landed and outcome.paid_calls and outcome.content_hash:
                    process.outstanding[outcome.content_hash] -= outcome.paid_calls
            process.outstanding += Counter()  # drop what went to zero
        return written

    def noted(repair, why):
        def noting(self, *arguments):
            repaired = repair(self, *arguments)
            sim.repairs += [(why, message) for message in repaired]
            return repaired

        return noting

    def renewing(engine, tokens):
        try:
            return renew_all(engine, tokens)
        except SQLAlchemyError:
            sim.stats["renewals failed"] += 1
            sim.unrenewed.update(tokens)
            raise

    ImageQueue.write = counted  # type: ignore[method-assign]
    ImageQueue.claim = watched_claim  # type: ignore[method-assign]
    ImageQueue.release = released  # type: ignore[method-assign]
    WindowSlots.repair_lapsed = noted(repair_lapsed, "lapsed")  # type: ignore[method-assign]
    WindowSlots.repair_lost = noted(repair_lost, "lost")  # type: ignore[method-assign]
    leases.renew_all = renewing
    try:
        yield
    finally:
        ImageQueue.write, ImageQueue.claim, ImageQueue.release = write, claim, release  # type: ignore[method-assign]
        WindowSlots.repair_lapsed, WindowSlots.repair_lost = repair_lapsed, repair_lost  # type: ignore[method-assign]
        leases.renew_all = renew_all


def _hook_commits(engine: Engine, simulation: Callable[[], Simulation | None]) -> None:
    """Every commit is a fault point of the process that makes it: a crash just before it or just
    after it, or its acknowledgement lost (the transaction took effect; the code sees the
    connection fail). Others may run before a commit and after it."""
    dialect = engine.dialect
    commit = dialect.do_commit

    def do_commit(dbapi_connection) -> None:
        sim = simulation()
        if sim is None or not sim.scheduler.in_task() or sim.scheduler.dying():
            commit(dbapi_connection)
            return
        faults, rng = sim.faults, sim.commit_faults
        if sim.database == "postgresql":
            sim.scheduler.sleep(sim.scheduler.rng.uniform(*postgres.STATEMENT_SECONDS))
        if faults.chance(rng, faults.crash_before_commit):
            sim.stats["crash before commit"] += 1
            raise SimulatedCrash("before a commit")
        commit(dbapi_connection)
        if faults.chance(rng, faults.crash_after_commit):
            sim.stats["crash after commit"] += 1
            raise SimulatedCrash("after a commit")
        if faults.chance(rng, faults.lost_ack):
            sim.stats["acknowledgement lost"] += 1
            raise dialect.loaded_dbapi.OperationalError("simulated: the connection was lost after COMMIT")
        sim.scheduler.pause()

    dialect.do_commit = do_commit  # type: ignore[method-assign]


# -- databases -------------------------------------------------------------------------------------


class Databases:
    """The database of a campaign, emptied for each run, and one engine on it for all runs (its
    compiled statements kept): SQLite copies a template file over the run's file; PostgreSQL
    empties its tables, and interleaves the tasks' statements (``postgres.py``)."""

    def __init__(self, kind: str, postgres_url: str | None = None) -> None:
        self.kind = kind
        self.simulation: Simulation | None = None
        if kind == "sqlite":
            shm = Path("/dev/shm")
            self.folder = Path(tempfile.mkdtemp(prefix="celebscan-sim-", dir=shm if shm.is_dir() else None))
            self.template, self.path = self.folder / "template.db", self.folder / "run.db"
            url = f"sqlite:///{self.template}"
        else:
            assert postgres_url is not None
            url = with_driver(postgres_url)
        engine = connect(url)
        checker.install_watches(engine)
        engine.dispose()
        if kind == "sqlite":
            self.engine = create_engine(f"sqlite:///{self.path}", **_engine_options(f"sqlite:///{self.path}"))
            event.listen(self.engine, "connect", _sqlite_connection)
        else:
            postgres.install(engine.url.set(drivername="postgresql").render_as_string(hide_password=False))
            options = _engine_options(url)
            options["connect_args"] = {**options["connect_args"], "cursor_factory": postgres.PausingCursor}
            self.engine = create_engine(url, pool_size=20, **options)
        _hook_commits(self.engine, lambda: self.simulation)

    def fresh(self) -> Engine:
        self.engine.dispose()
        if self.kind == "sqlite":
            for old in self.folder.glob("run.db*"):
                old.unlink()
            shutil.copy(self.template, self.path)
            return self.engine
        tables = ", ".join([table.name for table in metadata.sorted_tables] + checker.WATCH_TABLES)
        with self.engine.begin() as conn:
            conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY"))
        return self.engine

    def close(self) -> None:
        self.engine.dispose()
        if self.kind == "sqlite":
            shutil.rmtree(self.folder, ignore_errors=True)
        else:
            postgres.uninstall()


def _sqlite_connection(dbapi_connection, _record) -> None:
    """As every celebscan SQLite connection (WAL, busy timeout); no machine crashes here, so
    commits need not wait for the disk."""
    from worker.database import _sqlite_pragmas

    _sqlite_pragmas(dbapi_connection, _record)
    dbapi_connection.execute("PRAGMA synchronous=OFF")


def run_seed(seed: int, databases: Databases, mutation: str | None = None) -> RunResult:
    simulation = Simulation(seed, databases.fresh(), databases.kind, mutation)
    databases.simulation = simulation
    try:
        return simulation.run()
    finally:
        databases.simulation = None


def run_seeds(seeds: list[int], kind: str, url: str | None, mutation: str | None = None) -> list[RunResult]:
    """Run ``seeds`` one after another on a database of their own (a process of a campaign)."""
    logging.disable(logging.CRITICAL)
    databases = Databases(kind, url)
    try:
        return [run_seed(seed, databases, mutation) for seed in seeds]
    finally:
        databases.close()


def campaign(
    seeds: list[int], kind: str, postgres_url: str | None = None, mutation: str | None = None, processes: int = 2
) -> list[RunResult]:
    """Run the seeds in ``processes`` processes side by side (each on its own database), in seed order."""
    import multiprocessing

    urls = [None] * processes if kind == "sqlite" else _postgres_databases(postgres_url, processes)
    shares = [seeds[number::processes] for number in range(processes)]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        results = pool.starmap(
            run_seeds, [(share, kind, url, mutation) for share, url in zip(shares, urls, strict=True)]
        )
    return sorted((result for share in results for result in share), key=lambda result: seeds.index(result.seed))


def _postgres_databases(postgres_url: str | None, count: int) -> list[str]:
    """A database per process on the server (made once, emptied by each run); a statement that
    waits in a deadlock is told within 50 ms (a seed's run then goes on sooner)."""
    from sqlalchemy.engine import make_url

    from worker.database import engine_for

    assert postgres_url is not None
    server = engine_for(postgres_url).execution_options(isolation_level="AUTOCOMMIT")
    urls = []
    with server.connect() as conn:
        for number in range(count):
            name = f"celebscan_simulation_{number}"
            if conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}).scalar():
                conn.execute(text(f"DROP DATABASE {name} WITH (FORCE)"))
            conn.execute(text(f"CREATE DATABASE {name}"))
            conn.execute(text(f"ALTER DATABASE {name} SET deadlock_timeout = '50ms'"))
            urls.append(make_url(postgres_url).set(database=name).render_as_string(hide_password=False))
    server.dispose()
    return urls
