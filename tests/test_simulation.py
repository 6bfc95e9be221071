"""The seeded simulation of faults (``tests/simulation/``) as CI runs it: seeds on SQLite and on
PostgreSQL (where the tasks' transactions interleave statement by statement), each driving the real
claim, listing, batch, window and write code, on a model of Celery (held to a real worker by
``tests/test_celery_model.py``), through crashes at commits, lost acknowledgements, redelivered,
duplicated and lost messages, nodes killed and stopped, stalls, slow calls and time limits,
throttling and overlapping scans; then, nobody resuming, checking the guarantees of
docs/operations.md. A failing seed prints the command that replays it. Every bug put back on
purpose stays here with seeds that catch it (they must fail with it and pass without it); longer
campaigns: ``python -m bench.simulate --seeds N``.
"""

from __future__ import annotations

import time

import pytest

from bench.simulate import summary
from tests.simulation.mutations import MUTATIONS
from tests.simulation.run import Databases, _postgres_databases, campaign, run_seed

pytestmark = pytest.mark.slow

SQLITE_SEEDS = 100
POSTGRESQL_SEEDS = 50

#: Bugs put back (``tests/simulation/mutations.py``), each with seeds that catch it, and the
#: database it is caught on: the issue-27 ones need transactions that interleave (PostgreSQL).
CAUGHT_BY: dict[str, tuple[str, list[int]]] = {
    "unfenced-write": ("sqlite", [14, 16]),
    "listing-end-apart": ("sqlite", [50, 73]),
    "resume-releases-claims": ("sqlite", [35, 41]),
    "scan-takes-held-images": ("sqlite", [3, 12]),
    "read-any-version": ("sqlite", [64]),
    "no-listing-help": ("sqlite", [12, 16]),
    "write-without-claim-guard": ("postgresql", [18, 88, 43]),
    "image-leases-never-renewed": ("postgresql", [18, 62, 158]),
    "lock-scan-no-op": ("postgresql", [45, 18]),
    "lease-keeper-never-renewing": ("postgresql", [28, 37, 57]),
    "time-limit-acknowledges": ("postgresql", [43, 49, 28]),
}
#: Seeds that found a bug, kept once it was fixed: 52708 counted one paid call twice (a write's
#: replay after a lost acknowledgement, its image taken over by --force in between). PostgreSQL's
#: 140 and SQLite's 79 found the checker wrong (a release committed between its look and a claim;
#: a killed run's message, redelivered after its slot was sent again, counted against the window).
REGRESSIONS = {"sqlite": [52708, 79], "postgresql": [140]}


def run_campaign(seeds: int, database: str, capsys, postgres_url: str | None = None) -> list:
    started = time.perf_counter()
    results = campaign(list(range(seeds)), database, postgres_url)
    report = summary(results, database, None, time.perf_counter() - started)
    with capsys.disabled():
        print("\n" + report)
    assert all(result.ok for result in results), report
    return results


def test_the_guarantees_hold_on_sqlite(capsys):
    run_campaign(SQLITE_SEEDS, "sqlite", capsys)


def test_the_guarantees_hold_on_postgresql_with_interleaved_transactions(postgres_url, capsys):
    results = run_campaign(POSTGRESQL_SEEDS, "postgresql", capsys, postgres_url)
    waits = sum(result.stats["lock waits"] for result in results)
    interleaved = sum(result.stats["statements interleaved in a transaction"] for result in results)
    assert waits > 0 and interleaved > 0, "transactions must overlap and contend on PostgreSQL"


def test_the_same_seed_runs_a_schedule_on_postgresql_that_sqlite_cannot(postgres_url):
    """On SQLite a transaction runs whole; on PostgreSQL others run between its statements: the
    same seeds give other schedules, and statements wait for each other's locks."""
    [url] = _postgres_databases(postgres_url, 1)
    sqlite, postgresql = Databases("sqlite"), Databases("postgresql", url)
    try:
        pairs = [(run_seed(seed, sqlite), run_seed(seed, postgresql)) for seed in range(8)]
    finally:
        sqlite.close()
        postgresql.close()
    assert all(one.ok and other.ok for one, other in pairs)
    assert sum(one.stats["steps"] != other.stats["steps"] for one, other in pairs) >= 6
    assert all(one.stats["lock waits"] == 0 for one, _ in pairs)
    assert sum(other.stats["statements interleaved in a transaction"] for _, other in pairs) > 0


@pytest.mark.parametrize("database", sorted(REGRESSIONS))
def test_the_seeds_that_found_bugs_pass(database, request):
    databases = Databases(database, _database_url(database, request))
    try:
        for seed in REGRESSIONS[database]:
            result = run_seed(seed, databases)
            assert result.ok, f"seed {seed}: {result.violations[:3]} ({result.replay_command()})"
    finally:
        databases.close()


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_each_bug_put_back_is_caught_by_its_seeds(mutation, request):
    database, seeds = CAUGHT_BY[mutation]
    assert seeds, f"no seed is recorded for {mutation}"
    databases = Databases(database, _database_url(database, request))
    try:
        missed = []
        for seed in seeds:
            if run_seed(seed, databases, mutation).ok:
                missed.append(seed)
            fixed = run_seed(seed, databases)
            assert fixed.ok, f"seed {seed} fails without {mutation}: {fixed.violations[:3]}"
    finally:
        databases.close()
    # On SQLite a seed replays its run exactly: each must catch the bug. On PostgreSQL which of
    # several transactions waiting for one row goes on first is the server's choice: one must.
    caught_by_all = database == "sqlite"
    assert not missed if caught_by_all else len(missed) < len(seeds), f"seeds {missed} no longer catch {mutation}"


def _database_url(database: str, request) -> str | None:
    """A database of the PostgreSQL server the tests started, for the seeds run on PostgreSQL."""
    return _postgres_databases(request.getfixturevalue("postgres_url"), 1)[0] if database == "postgresql" else None
