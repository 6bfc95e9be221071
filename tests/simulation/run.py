"""One seeded run of the simulation: celebscan's real claim, listing, batch and write code under
a seeded schedule of faults, then a quiet end, then the invariants checked (``checker.py``).

What a run does, every choice drawn from its seed:
- a bucket of a few dozen objects: pictures under several keys each (copies), a picture that
  kills whichever worker recognizes it, objects that are not images, multipart ETags;
- two or three worker processes taking window slots and listing parts from a simulated broker
  (redelivery at once or after the visibility timeout, duplicates, loss, reordering, delay, and
  a broker restarted empty);
- a user who scans the bucket, starts an overlapping scan (maybe ``--force`` or ``--max-cost``),
  resumes scans while workers run, and changes the bucket while it is listed;
- a crash injected before and after commits (every transaction is a candidate), acknowledgements
  of commits lost (the transaction is retried), S3 and the recognizer throttling and failing,
  and stalls of the machine long enough for leases to run out;
- then the faults stop: the user resumes what is stalled (as ``celebscan metrics`` tells them),
  and the run ends when every scan is finished.
"""

from __future__ import annotations

import itertools
import logging
import random
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine, event, select, text
from sqlalchemy.exc import SQLAlchemyError

from producer.scan import ScanRequest, Services, run_scan
from tests.simulation import checker, mutations
from tests.simulation.scheduler import OutOfTime, Scheduler, SimulatedCrash
from tests.simulation.world import (
    BUCKET,
    NOT_AN_IMAGE,
    Bucket,
    Calls,
    Faults,
    SimBroker,
    SimRecognizer,
    SimS3,
    md5,
    picture_bytes,
)
from worker import clock
from worker.batch import WorkerContext
from worker.database import connect, engine_for
from worker.media.images import ImageLimits
from worker.queue.images import ImageQueue
from worker.queue.leases import renew_all
from worker.recognizers import Recognizers
from worker.schema import metadata, pictures, scans
from worker.settings import Settings
from worker.sources import S3Reader
from worker.store import ResultStore
from worker.tasks import run_listing_part, run_window_slot

log = logging.getLogger(__name__)

SOURCE = f"s3://{BUCKET}/"
#: Simulated seconds of chaos before the faults stop; and how long the quiet end may take at most.
CHAOS_SECONDS = 100.0
QUIET_SECONDS = 3600.0
MAX_STEPS = 30_000


@dataclass
class RunResult:
    seed: int
    database: str
    violations: list[str]
    stats: Counter = field(default_factory=Counter)
    worst_excess: int = 0  # the most paid calls of one picture beyond 1 (and its allowance)
    bound: str = ""

    @property
    def ok(self) -> bool:
        return not self.violations

    def replay_command(self) -> str:
        return f"python -m bench.simulate --seed {self.seed} --database {self.database}"


@dataclass(eq=False)
class Process:
    """A simulated OS process: its own engine (as every worker process has), its tasks, and the
    paid calls it made that its writes have not recorded yet."""

    name: str
    engine: Engine
    outstanding: list[str] = field(default_factory=list)
    alive: bool = True
    token: str = ""  # the run it works on now
    run_started: float = 0.0


class Simulation:
    def __init__(self, seed: int, engine: Engine, database: str, mutation: str | None = None) -> None:
        self.seed, self.engine, self.database, self.mutation = seed, engine, database, mutation
        database_url = engine.url.render_as_string(hide_password=False)
        self.rng = random.Random(seed)
        self.scheduler = Scheduler(random.Random(self.rng.random()))
        self.faults = _draw_faults(self.rng)
        self.scheduler.stall_probability = self.rng.choice([0.0, 0.002, 0.005])
        self.lease = self.rng.choice([20.0, 40.0])
        self.scheduler.stall_seconds = (self.lease * 0.5, self.lease * 2.5)
        self.scheduler.on_stall = self._stalled
        self.visibility = self.rng.choice([60.0, 120.0])
        self.bucket = Bucket()
        self.poison: set[str] = set()
        self.pictures = self._fill_bucket()
        self.s3 = SimS3(
            self.bucket, self.scheduler, random.Random(self.rng.random()), self.faults, self.rng.choice([4, 7, 50])
        )
        self.calls = Calls()
        self.interruptions: Counter = Counter()  # by picture: crashes and stalls between a call and its write
        self.broker = SimBroker(self.scheduler, random.Random(self.rng.random()), self.faults, self.visibility)
        self.stats: Counter = Counter()
        self.errors: list[str] = []
        self.dead_runs: set[str] = set()  # the runs of processes that crashed: their claims lapse
        self.long_stalls: list[float] = []  # when the machine stalled longer than a lease
        self.unrenewed: set[str] = set()  # runs whose lease keeper failed a renewal
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
        )

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
        """A process of its own, sharing the run's engine (its pool and compiled statements): one
        task never holds a connection while it waits, so the processes never share a transaction."""
        return Process(name, self.engine)

    def guarded(self, process: Process, body: Callable[[], None], what: str) -> Callable[[], None]:
        """A task's body: a crash kills its process (the other tasks, the message it held); any
        other error escaping celebscan's code is a violation."""

        def run() -> None:
            try:
                body()
            except SimulatedCrash:
                self.crash(process)
            except OutOfTime:
                raise
            except Exception as exc:  # the real code let an error out of a task: that is a finding
                log.exception("%s raised", what)
                self.errors.append(f"{what} raised {type(exc).__name__}: {exc}")

        return run

    def crash(self, process: Process) -> None:
        if not process.alive:
            return
        process.alive = False
        self.dead_runs.add(process.token)
        self.stats["processes crashed"] += 1
        log.info(
            "t=%.1f %s crashed in run %s, calls not written: %s",
            self.scheduler.t,
            process.name,
            process.token,
            process.outstanding,
        )
        for picture in process.outstanding:
            self.interruptions[picture] += 1
        process.outstanding.clear()
        self.scheduler.kill(process)
        self.broker.died(process)
        if process.name.startswith("worker"):
            self.start_worker(process.name, delay=self.rng.uniform(1.0, 20.0))

    def _stalled(self, seconds: float) -> None:
        """The machine stalled: leases may run out. A picture a run was calling for may be taken over
        by a run with a copy of it, which calls too (the first run's write is not refused: it
        still holds its image)."""
        if seconds < self.lease * 3 / 4:  # a keeper renews every quarter lease: a shorter stall loses nothing
            self.stats["stalls"] += 1
            return
        self.stats["stalls that may cost a lease"] += 1
        self.long_stalls.append(self.scheduler.t)
        with self.engine.connect() as conn:
            for (picture,) in conn.execute(select(pictures.c.content_hash)):
                self.interruptions[picture] += 1

    def may_have_lost_its_leases(self, process: Process | None, token: str) -> bool:
        """A run's claims can lapse only if the machine stalled during the run for longer than a lease
        less the time between renewals, or its lease keeper failed to renew them."""
        started = process.run_started if process is not None else 0.0
        return token in self.unrenewed or any(moment >= started for moment in self.long_stalls)

    def current_process(self) -> Process | None:
        task = self.scheduler.current
        return task.process if task is not None and isinstance(task.process, Process) else None

    def start_worker(self, name: str, delay: float = 0.0) -> None:
        process = self.new_process(name)
        context = self.worker_context(process)
        self.scheduler.spawn(self.guarded(process, lambda: self._work(process, context), name), name, process, delay)

    def worker_context(self, process: Process) -> WorkerContext:
        recognizer = SimRecognizer(
            self.scheduler, random.Random(self.rng.random()), self.faults, self.calls, self._called, self.poison
        )
        return WorkerContext(
            store=ResultStore(process.engine),
            readers={"s3": S3Reader(self.s3, max_bytes=10**8)},
            recognizers=Recognizers.of(recognizer),
            limits=ImageLimits(),
            max_attempts=self.settings.max_attempts,
            retry_base_seconds=0.5,
            retry_deadline=self.settings.retry_deadline,
            batch_size=self.settings.batch_size,
            lease_seconds=self.lease,
            batch_seconds=self.settings.run_seconds,
            keep_leases=self._keep_leases,
            refill_inline=True,  # a run claims its scan's next batches, one token each, as a fleet's do
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
            process.outstanding.append(picture)

    @contextmanager
    def _keep_leases(
        self, engine: Engine, tokens: Callable[[], Collection[str]], lease_seconds: float, deadline: float | None
    ) -> Iterator[None]:
        """The lease keeper, as a task of the process (the thread of production)."""
        process = self.current_process()
        stopped = [False]

        def keep() -> None:
            while True:
                self.scheduler.sleep(lease_seconds / 4)
                if stopped[0] or (deadline is not None and self.scheduler.t > deadline):
                    return
                try:
                    renew_all(engine, tokens())
                except SQLAlchemyError:  # as the keeper thread does: the next round tries again
                    self.stats["renewals failed"] += 1
                    self.unrenewed.update(tokens())

        if process is not None:
            token = next(iter(tokens()))
            self.scheduler.spawn(self.guarded(process, keep, f"lease keeper of {token}"), f"keeper {token}", process)
        try:
            yield
        finally:
            stopped[0] = True

    def _work(self, process: Process, context: WorkerContext) -> None:
        """A worker process: take a due message, run it with a claim token of its own, acknowledge it."""
        while True:
            message = self.broker.take(process)
            if message is None:  # nothing due: wait for the next message (or a new one), as a worker blocks
                self.scheduler.sleep(min(max(0.05, self.broker.next_due() - self.scheduler.t), 2.0))
                continue
            token = f"{process.name}:m{message.number}:r{next(self._runs)}"
            process.token, process.run_started = token, self.scheduler.t
            self.stats[f"{message.kind} runs"] += 1
            if message.kind == "slot":
                scan_id, idle_rounds = message.args
                run_window_slot(
                    scan_id,
                    context,
                    token,
                    lambda countdown, rounds, scan_id=scan_id: self.broker.send("slot", (scan_id, rounds), countdown),
                    idle_rounds,
                )
            else:
                (part_id,) = message.args
                run_listing_part(
                    part_id,
                    context,
                    token,
                    lambda part, countdown: self.broker.send("list", (part,), countdown),
                    s3_client=self.s3,
                )
            self.broker.ack(message)

    # -- the user ----------------------------------------------------------------------------------

    def services(self) -> Services:
        def open_window(scan_id: int, part_ids) -> None:
            for part_id in part_ids:
                self.broker.send("list", (part_id,))
            for _ in range(self.settings.window):
                self.broker.send("slot", (scan_id, 0))

        return Services(s3=lambda: self.s3, open_window=open_window, check_broker=lambda: None)

    def as_user(self, name: str, request: ScanRequest) -> bool:
        """One ``celebscan scan`` command, in a producer process of its own (which may crash);
        returns whether it ended well."""
        process = self.new_process(f"producer {name}")
        try:
            run_scan(
                ResultStore(process.engine), self.settings, request, say=lambda line: None, services=self.services()
            )
            self.stats[f"user {name}"] += 1
            return True
        except SimulatedCrash:
            self.crash(process)
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
            action = self.rng.choices(["overlap", "resume", "mutate", "broker lost", "nothing"], [3, 1.5, 2, 0.3, 2])[0]
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
                self.broker.forget_everything()
                self.stats["broker restarted empty"] += 1

    def _quiet_end(self) -> None:
        """The faults stop; the user resumes what is stalled (no message of it in the broker, or
        its --max-cost budget spent) and waits for every scan to finish."""
        while True:
            self.scheduler.sleep(30.0)
            unfinished = self._unfinished()
            if not unfinished:
                self.finished = True
                return
            for scan_id, budget in unfinished:
                if budget is not None or not self.broker.waiting_for(scan_id, self._part_scans()):
                    self.as_user("resume when stalled", ScanRequest(resume_id=scan_id))

    def _latest_scan(self) -> int | None:
        with self.checker_engine.connect() as conn:
            return conn.execute(text("SELECT max(id) FROM scans")).scalar()

    def _unfinished(self) -> list[tuple[int, int | None]]:
        with self.checker_engine.connect() as conn:
            return [
                (row.id, row.budget_images)
                for row in conn.execute(select(scans.c.id, scans.c.budget_images).where(scans.c.finished_at.is_(None)))
            ]

    def _part_scans(self) -> dict[int, int]:
        with self.checker_engine.connect() as conn:
            return dict(conn.execute(text("SELECT id, scan_id FROM listing_parts")).all())  # type: ignore[arg-type]

    # -- the run ----------------------------------------------------------------------------------

    def run(self) -> RunResult:
        random.seed(self.rng.random())  # celebscan's own jitter (backoff, resend delays)
        self.checker_engine = self.engine
        self.commit_faults = random.Random(self.rng.random())
        with clock.using(self.scheduler), mutations.applied(self.mutation), _counting_writes(self):
            for number in range(self.rng.choice([2, 3])):
                self.start_worker(f"worker-{number + 1}")
            user = self.new_process("user")
            chaos = self.scheduler.spawn(self.guarded(user, self._chaos, "the user"), "user", user)
            result = RunResult(self.seed, self.database, [], self.stats)
            try:
                self.scheduler.run_until(lambda: chaos.done, seconds=CHAOS_SECONDS * 4, max_steps=MAX_STEPS)
                self.faults.active = False
                self.scheduler.stall_probability = 0.0
                self.stats["steps of chaos"] = self.scheduler.steps
                quiet = self.new_process("quiet user")
                self.scheduler.spawn(self.guarded(quiet, self._quiet_end, "the user at the end"), "quiet user", quiet)
                self.scheduler.run_until(lambda: self.finished, seconds=QUIET_SECONDS, max_steps=MAX_STEPS)
            except OutOfTime as exc:
                result.violations.append(f"liveness: {exc}; unfinished scans: {self._unfinished()}")
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
        return result

    def _stop_every_task(self) -> None:
        for task in self.scheduler.tasks:
            if isinstance(task.process, Process):
                task.process.alive = False
        self.scheduler.tasks.clear()


def _draw_faults(rng: random.Random) -> Faults:
    level = rng.choice([0.0, 0.25, 0.5, 1.0])
    return Faults(
        crash_before_commit=0.01 * level,
        crash_after_commit=0.01 * level,
        lost_ack=0.01 * level,
        s3_throttle=0.05 * level,
        recognizer_throttle=0.08 * level,
        recognizer_5xx=0.04 * level,
        duplicate=0.03 * level,
        loss=0.02 * level,
    )


def _hook_commits(engine: Engine, simulation: Callable[[], Simulation | None]) -> None:
    """Every commit is a fault point of the process that makes it: a crash just before it or just
    after it, or its acknowledgement lost (the transaction took effect; the code sees the
    connection fail). After a commit others may run."""
    dialect = engine.dialect
    commit = dialect.do_commit

    def do_commit(dbapi_connection) -> None:
        sim = simulation()
        if sim is None or not sim.scheduler.in_task():
            commit(dbapi_connection)
            return
        faults, rng = sim.faults, sim.commit_faults
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


@contextmanager
def _counting_writes(sim: Simulation) -> Iterator[None]:
    """Each write's paid calls that reached the database, and a process's calls written."""
    write = ImageQueue.write

    def counted(self, token, outcomes):
        written = write(self, token, outcomes)
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
            process.outstanding.clear()
        return written

    ImageQueue.write = counted  # type: ignore[method-assign]
    try:
        yield
    finally:
        ImageQueue.write = write  # type: ignore[method-assign]


# -- databases -------------------------------------------------------------------------------------


class Databases:
    """The database of a campaign, emptied for each run, and one engine on it for all runs (its
    compiled statements kept): SQLite copies a template file over the run's file; PostgreSQL
    empties its tables."""

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
            url = postgres_url
        engine = connect(url)
        checker.install_watches(engine)
        engine.dispose()
        self.engine = engine_for(f"sqlite:///{self.path}" if kind == "sqlite" else url)
        if kind == "sqlite":  # no machine crashes here: commits need not wait for the disk
            event.listen(self.engine, "connect", _no_disk_waits)
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


def _no_disk_waits(dbapi_connection, _record) -> None:
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
    """A database per process on the server (made once, emptied by each run)."""
    from sqlalchemy.engine import make_url

    assert postgres_url is not None
    server = engine_for(postgres_url).execution_options(isolation_level="AUTOCOMMIT")
    urls = []
    with server.connect() as conn:
        for number in range(count):
            name = f"celebscan_simulation_{number}"
            if not conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}).scalar():
                conn.execute(text(f"CREATE DATABASE {name}"))
            else:
                conn.execute(text(f"DROP DATABASE {name} WITH (FORCE)"))
                conn.execute(text(f"CREATE DATABASE {name}"))
            urls.append(make_url(postgres_url).set(database=name).render_as_string(hide_password=False))
    server.dispose()
    return urls
