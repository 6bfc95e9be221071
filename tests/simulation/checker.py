"""The invariants a simulated run must keep (the guarantees of docs/operations.md, "Failure
semantics"), checked at its end, and the watches (triggers) that catch what happens on the way: a
row going back from ``done``/``failed`` to ``queued`` other than by a scan's listing, a budget
exceeded even for a moment. That every scan finished by itself, nobody resuming it, within a
bounded time after the faults stopped, is checked by the run (``run.py``).
"""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from typing import TYPE_CHECKING

from sqlalchemy import Engine, func, select, text

from worker.batch import MAX_DELIVERIES, run_of
from worker.schema import DONE, FAILED, QUEUED, faces, images, listing_parts, person_images, pictures, scans
from worker.store import ResultStore

if TYPE_CHECKING:
    from tests.simulation.run import RunResult, Simulation

WATCH_TABLES = ["sim_regressions", "sim_budget_exceeded"]

_SQLITE_WATCHES = [
    "CREATE TABLE sim_regressions (image_id INTEGER, old_status TEXT, old_scan INTEGER, new_scan INTEGER)",
    """CREATE TRIGGER sim_watch_regressions AFTER UPDATE OF status ON images
       WHEN OLD.status IN ('done', 'failed') AND NEW.status = 'queued'
       BEGIN INSERT INTO sim_regressions VALUES (NEW.id, OLD.status, OLD.scan_id, NEW.scan_id); END""",
    "CREATE TABLE sim_budget_exceeded (scan_id INTEGER, handed_out INTEGER, budget INTEGER)",
    """CREATE TRIGGER sim_watch_budget AFTER UPDATE OF handed_out ON scans
       WHEN NEW.budget_images IS NOT NULL AND NEW.handed_out > NEW.budget_images
       BEGIN INSERT INTO sim_budget_exceeded VALUES (NEW.id, NEW.handed_out, NEW.budget_images); END""",
]
_POSTGRESQL_WATCHES = [
    "CREATE TABLE sim_regressions (image_id integer, old_status text, old_scan integer, new_scan integer)",
    """CREATE FUNCTION sim_regression() RETURNS trigger AS $$ BEGIN
         INSERT INTO sim_regressions VALUES (NEW.id, OLD.status, OLD.scan_id, NEW.scan_id); RETURN NEW;
       END $$ LANGUAGE plpgsql""",
    """CREATE TRIGGER sim_watch_regressions AFTER UPDATE OF status ON images FOR EACH ROW
       WHEN (OLD.status IN ('done', 'failed') AND NEW.status = 'queued') EXECUTE FUNCTION sim_regression()""",
    "CREATE TABLE sim_budget_exceeded (scan_id integer, handed_out bigint, budget bigint)",
    """CREATE FUNCTION sim_budget() RETURNS trigger AS $$ BEGIN
         INSERT INTO sim_budget_exceeded VALUES (NEW.id, NEW.handed_out, NEW.budget_images); RETURN NEW;
       END $$ LANGUAGE plpgsql""",
    """CREATE TRIGGER sim_watch_budget AFTER UPDATE OF handed_out ON scans FOR EACH ROW
       WHEN (NEW.budget_images IS NOT NULL AND NEW.handed_out > NEW.budget_images) EXECUTE FUNCTION sim_budget()""",
]


def install_watches(engine: Engine) -> None:
    statements = _POSTGRESQL_WATCHES if engine.dialect.name == "postgresql" else _SQLITE_WATCHES
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(text(statement))


def check(sim: Simulation, result: RunResult) -> None:
    """Append to ``result.violations`` every invariant the run broke."""
    store = ResultStore(sim.engine)
    violations = result.violations
    summaries = {}
    with sim.engine.connect() as conn:
        rows = conn.execute(
            select(
                images.c.id,
                images.c.key,
                images.c.etag,
                images.c.status,
                images.c.scan_id,
                images.c.content_hash,
                images.c.error_code,
            )
        ).all()
        regressions = conn.execute(text("SELECT image_id, old_status, old_scan, new_scan FROM sim_regressions")).all()
        over_budget = conn.execute(text("SELECT scan_id, handed_out, budget FROM sim_budget_exceeded")).all()
        scan_rows = conn.execute(select(scans)).all()
        # A picture taken by a run that crashed stays until its lease runs out: nobody holds it.
        held_pictures = sum(
            run_of(holder) not in sim.dead_runs
            for (holder,) in conn.execute(
                select(pictures.c.holder).where(
                    pictures.c.held_at >= sim.scheduler.now() - timedelta(seconds=sim.lease)
                )
            )
        )
        open_parts = conn.execute(select(func.count()).where(listing_parts.c.status == QUEUED)).scalar_one()
        face_names = conn.execute(select(faces.c.image_id, faces.c.name)).all()
        kept = Counter(
            {
                (row.scan_id, row.name, row.person_id): row.images
                for row in conn.execute(select(person_images)).all()
                if row.images
            }
        )
        recount = Counter(
            {
                (scan_id, name, person): count
                for scan_id, name, person, count in conn.execute(
                    select(
                        images.c.scan_id,
                        faces.c.name,
                        func.coalesce(faces.c.person_id, ""),
                        func.count(func.distinct(faces.c.image_id)),
                    )
                    .join(images, images.c.id == faces.c.image_id)
                    .where(faces.c.name.is_not(None))
                    .group_by(images.c.scan_id, faces.c.name, func.coalesce(faces.c.person_id, ""))
                ).all()
            }
        )
    force_scans = {row.id for row in scan_rows if not row.reuse_results}

    # Exactly once: every object in the bucket since before the scans has its row, and every row ended.
    by_object = {(row.key, row.etag): row for row in rows}
    for key, stored in sorted(sim.bucket.objects.items()):
        if key in sim.bucket.changed:
            continue  # written after the first scan listed: the scans that listed it since have its row
        row = by_object.get((key, stored.etag))
        if row is None:
            violations.append(f"object {key} ({stored.etag}) has no row")
    for row in rows:
        if row.status not in (DONE, FAILED):
            violations.append(f"image {row.id} ({row.key}) ended {row.status}")
    # Never back from done/failed to queued, but by a scan's listing (a failure retried, or --force).
    for image_id, old_status, old_scan, new_scan in regressions:
        if old_scan == new_scan or (old_status == DONE and new_scan not in force_scans):
            violations.append(
                f"image {image_id} went from {old_status} back to queued in scan {new_scan} (was {old_scan})"
            )
    for scan_id, handed_out, budget in over_budget:
        violations.append(f"scan {scan_id} handed out {handed_out} images with a budget of {budget}")
    # Every scan finished, its figures adding up to its rows.
    for scan in scan_rows:
        summary = summaries[scan.id] = store.summary(scan.id)
        if summary.finished_at is None:
            violations.append(f"scan {scan.id} never finished")
        rows_in_scan = sum(summary.counts.values())
        accounted = summary.skipped + summary.held_elsewhere + rows_in_scan + summary.handed_over
        if summary.listed != accounted:
            violations.append(
                f"scan {scan.id}: listed {summary.listed} != skipped {summary.skipped} + held elsewhere "
                f"{summary.held_elsewhere} + its images {rows_in_scan} + handed over {summary.handed_over}"
            )
    if kept != recount:
        violations.append(f"person_images {dict(kept)} != a recount from faces {dict(recount)}")
    if held_pictures or open_parts:
        violations.append(f"claims left held: {held_pictures} pictures, {open_parts} listing parts still open")
    # One result per image: a done image shows the one person of the picture it read.
    names_of: dict[int, list] = {}
    for image_id, name in face_names:
        names_of.setdefault(image_id, []).append(name)
    for row in rows:
        if row.status == DONE and row.content_hash and names_of.get(row.id) != [f"person {row.content_hash[:8]}"]:
            violations.append(f"image {row.id} ({row.key}) has faces {names_of.get(row.id)}")
    # Slowness is transient: an image is quarantined only when it killed its workers, or faults cut
    # the runs that started it as often (a crash and a kill look alike to the fleet).
    for row in rows:
        innocent = row.content_hash not in sim.poison and sim.disruptions[row.id] < MAX_DELIVERIES
        if row.error_code == "Quarantined" and innocent:
            violations.append(
                f"image {row.id} ({row.key}) was quarantined, yet it never killed a worker "
                f"({sim.disruptions[row.id]} runs of it cut by a fault)"
            )
    _check_window(sim, violations)
    _check_paid_calls(sim, result, sum(summary.paid_calls for summary in summaries.values()), len(force_scans))


def _check_window(sim: Simulation, violations: list[str]) -> None:
    """A time limit never eats a slot (a run cut by its hard limit has its message requeued), and the
    window never shrinks but by a fault: a slot is repaired only when a fault took its message or its
    run (lost, flushed, never sent because its sender died, delivered to a node that died or
    stopped, or to a machine that stalled). The broker holds at most the window plus one stale
    message per pool process."""
    for messages in sim.broker.history.values():
        for message in messages:
            if message.fate == "acknowledged at its hard time limit":
                violations.append(f"a hard time limit acknowledged {message.id}: its slot waited for a repair")
    for why, repaired in sim.repairs:
        sent = sim.broker.history.get(repaired.message_id, [])
        if not (not sent or any(_taken_by_a_fault(sim, message) for message in sent)):
            fates = sorted({message.fate or "in the broker" for message in sent})
            violations.append(
                f"window slot {repaired.slot} of scan {repaired.scan_id} ({why}, generation {repaired.generation}) "
                f"was repaired, yet no fault took its message ({', '.join(fates)})"
            )
    for scan_id, peak in sorted(sim.broker_peak.items()):
        if peak > sim.settings.window + sim.pool_processes:
            violations.append(
                f"scan {scan_id}: the broker held {peak} slot messages at once for a window of "
                f"{sim.settings.window} and {sim.pool_processes} pool processes"
            )
    for message in sim.superseded.values():
        duplicated = len(sim.broker.history.get(message.id, [])) > 1
        if not (duplicated or message.restored or _taken_by_a_fault(sim, message)):
            violations.append(
                f"slot message {message.id} came back to the queue after its slot's next generation was "
                "sent, yet no fault brought it back"
            )


def _taken_by_a_fault(sim: Simulation, message) -> bool:
    if message.fate in ("lost", "flushed") or message.requeued_at_time_limit:
        return True
    return bool(sim.long_stalls) or any(not node.alive or node.process.stopped for node in message.receivers)


def _check_paid_calls(sim: Simulation, result: RunResult, recorded: int, force_scans: int) -> None:
    """At least once, bounded: a picture is paid for once, plus once per interruption (a crash
    between its call and its write, or a run that lost its claim meanwhile: its write refused, or
    the picture taken over by a copy's run after a stall), plus once per --force scan (its copies
    reuse that call). And the database counts every call that reached it, exactly once."""
    worst = -1
    for picture, calls in sorted(sim.calls.by_picture.items()):
        allowed = 1 + sim.interruptions[picture] + force_scans
        worst = max(worst, calls - allowed)
        if calls > allowed:
            result.violations.append(
                f"picture {picture[:8]} was paid for {calls} times; at most {allowed} "
                f"(interruptions {sim.interruptions[picture]}, --force scans {force_scans})"
            )
    if not sim.landed_calls <= recorded <= sim.calls.made:
        result.violations.append(
            f"the database records {recorded} paid calls; the writes that returned made {sim.landed_calls}, "
            f"and {sim.calls.made} calls were made"
        )
    lost = sim.calls.made - recorded
    if lost < 0 or lost > sum(sim.interruptions.values()):
        result.violations.append(
            f"{sim.calls.made} paid calls made, {recorded} recorded: {lost} lost, "
            f"{sum(sim.interruptions.values())} interruptions"
        )
    result.worst_excess = worst
    result.bound = "paid calls per picture <= 1 + interruptions + --force scans"
