"""The seeded simulation of faults (``tests/simulation/``) as CI runs it: 500 seeds on SQLite and
100 on PostgreSQL, each driving the real claim, listing, batch and write code through crashes at
commits, lost acknowledgements, redelivered, duplicated and lost messages, stalls, throttling and
overlapping scans, then checking the guarantees of docs/operations.md. A failing seed prints the command that
replays it. Every bug the simulation found stays here with the seeds that caught it, run with
the bug put back (they must fail) and without it (they must pass); longer campaigns:
``python -m bench.simulate --seeds N``.
"""

from __future__ import annotations

import time

import pytest

from bench.simulate import summary
from tests.simulation.mutations import MUTATIONS
from tests.simulation.run import Databases, campaign, run_seed

pytestmark = pytest.mark.slow

SQLITE_SEEDS = 500
POSTGRESQL_SEEDS = 100

#: Bugs put back (``tests/simulation/mutations.py``), each with seeds that catch it: the two the
#: issue names, the two the issue reproduced by hand, and the two the simulation found.
CAUGHT_BY = {
    "unfenced-write": [14, 82, 172],
    "listing-end-apart": [39, 60, 130],
    "resume-releases-claims": [0, 5, 9],
    "scan-takes-held-images": [43, 78, 104],
    "read-any-version": [177, 318, 352],
    "no-listing-help": [45, 60, 122],
}


def run_campaign(seeds: int, database: str, capsys, postgres_url: str | None = None) -> None:
    started = time.perf_counter()
    results = campaign(list(range(seeds)), database, postgres_url)
    report = summary(results, database, None, time.perf_counter() - started)
    with capsys.disabled():
        print("\n" + report)
    assert all(result.ok for result in results), report


def test_the_guarantees_hold_over_500_seeds_on_sqlite(capsys):
    run_campaign(SQLITE_SEEDS, "sqlite", capsys)


def test_the_guarantees_hold_over_100_seeds_on_postgresql(postgres_url, capsys):
    run_campaign(POSTGRESQL_SEEDS, "postgresql", capsys, postgres_url)


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_each_bug_put_back_is_caught_by_its_seeds(mutation):
    seeds = CAUGHT_BY[mutation]
    assert seeds, f"no seed is recorded for {mutation}"
    databases = Databases("sqlite")
    try:
        for seed in seeds:
            caught = run_seed(seed, databases, mutation)
            assert not caught.ok, f"seed {seed} no longer catches {mutation}: {caught.replay_command()}"
            fixed = run_seed(seed, databases)
            assert fixed.ok, f"seed {seed} fails without {mutation}: {fixed.violations[:3]}"
    finally:
        databases.close()
