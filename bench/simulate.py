"""The seeded simulation of faults, as long a campaign as you like (CI runs a fixed number of seeds).

Each seed drives celebscan's real claim, listing, batch, window and write code, on a model of Celery,
through a schedule of crashes, lost acknowledgements, redelivered, duplicated and lost messages,
nodes killed and stopped, stalls, slow calls, throttling and overlapping scans; then, nobody
resuming, checks that every scan finished and the invariants held (``tests/simulation/``). A failing seed prints the
one-line command that replays it (with its log).

    python -m bench.simulate --seeds 1000 [--first 0] [--database sqlite|postgresql] [--processes 2]
    python -m bench.simulate --seeds 500 --mutation unfenced-write     # how many seeds catch a bug put back
    python -m bench.simulate --seed 123 --database sqlite                # replay one seed, with its log
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import Counter
from contextlib import ExitStack

from tests.simulation.mutations import MUTATIONS
from tests.simulation.run import Databases, RunResult, campaign, run_seed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=100, help="how many seeds to run")
    parser.add_argument("--first", type=int, default=0, help="the first seed")
    parser.add_argument("--seed", type=int, help="replay this one seed, with its log")
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--processes", type=int, default=2, help="seeds run side by side in this many processes")
    parser.add_argument("--mutation", choices=MUTATIONS, help="put a known bug back and count the seeds that catch it")
    args = parser.parse_args()
    with ExitStack() as stack:
        postgres_url = None
        if args.database == "postgresql":
            from tests.servers import postgres_server

            postgres_url = stack.enter_context(postgres_server())
        started = time.perf_counter()
        if args.seed is not None:
            logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
            databases = Databases(args.database, postgres_url)
            stack.callback(databases.close)
            results = [run_seed(args.seed, databases, args.mutation)]
        else:
            seeds = list(range(args.first, args.first + args.seeds))
            results = campaign(seeds, args.database, postgres_url, args.mutation, args.processes)
        print(summary(results, args.database, args.mutation, time.perf_counter() - started))
    failed = [result for result in results if not result.ok]
    return 1 if failed and not args.mutation else 0


def summary(results: list[RunResult], database: str, mutation: str | None, seconds: float) -> str:
    """What a campaign found, as printed: each failing seed with its replay command and first
    violations, the faults injected, and the paid-call bound with the worst case seen."""
    lines = []
    totals: Counter = Counter()
    for result in results:
        totals.update(result.stats)
        if not result.ok:
            replay = result.replay_command() + (f" --mutation {mutation}" if mutation else "")
            lines.append(f"seed {result.seed} FAILED: replay with: {replay}")
            lines += [f"    {violation}" for violation in result.violations[:10]]
    failed = sum(not result.ok for result in results)
    lines.append(
        f"{len(results)} seeds on {database}{f' with mutation {mutation}' if mutation else ''} in {seconds:.1f} s: "
        f"{failed} failed"
    )
    lines.append("faults injected: " + ", ".join(f"{name} {count}" for name, count in sorted(totals.items())))
    worst = max((result.worst_excess for result in results), default=0)
    lines.append(
        "paid calls per picture: at most 1 + interruptions (a crash between a call and its write, a run that "
        "lost its claim meanwhile, a picture taken over after a stall) + one per --force scan; "
        f"worst case seen: {worst:+d} against that bound"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
