"""Bugs put back on purpose, to show the simulation catches them (``bench.simulate --mutation``),
each kept with the seeds that catch it (``tests/test_simulation.py``).

- ``unfenced-write``: a batch's write matches its images by id alone, as before the claim token
  fenced it: a run that lost its claim overwrites what another wrote.
- ``listing-end-apart``: a part's last page is committed, and the scan's listing ended in a
  transaction of its own after it, as before: a crash between the two leaves the listing open.
- ``resume-releases-claims``: ``scan --resume`` gives back every claim of the scan, live or not,
  as before: the live runs' images are recognized again.
- ``scan-takes-held-images``: a scan listing an image that another scan still works on (a run holds
  it, or it waits in a live scan's queue) takes it over, as before: both recognize it (issue 27's
  finding 3: a plain scan took a live --force scan's images).
- ``read-any-version``: a worker reads whatever the key holds now, not the version listed: an
  object overwritten after the listing gets the new picture's result under the old ETag, and
  the new version is paid for again (found by the simulation).
- ``no-listing-help``: window slots with nothing to claim never list a part left to nobody: a
  part whose lister died, with its message already gone, stays unlisted and the scan open for
  ever (found by the simulation).
- ``write-without-claim-guard``: a batch's write checks that its images are still queued, not that
  its run still holds them: a run whose lease ran out writes over the images another run took.
- ``image-leases-never-renewed``: a run's images are claimed once and never renewed: a run longer
  than a lease has them taken over while it still calls.
- ``lock-scan-no-op``: two transactions that may each end a scan's listing do not wait for each
  other: two parts ending at once both see the other still open, and the listing never ends.
- ``lease-keeper-never-renewing``: the thread beside a run never renews anything it holds.
- ``time-limit-acknowledges``: Celery acknowledges a message whose run its hard time limit killed
  (its default): the window slot the message carried is lost until the keeper repairs it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pytest
from sqlalchemy import bindparam, false, update

from worker.database import utcnow
from worker.outcomes import copy_faces_portable, replace_faces_portable
from worker.queue import pictures
from worker.queue import scans as scan_states
from worker.queue.images import ImageQueue, Written
from worker.queue.parts import ListingParts
from worker.schema import images, listing_parts

MUTATIONS = (
    "unfenced-write",
    "listing-end-apart",
    "resume-releases-claims",
    "scan-takes-held-images",
    "read-any-version",
    "no-listing-help",
    "write-without-claim-guard",
    "image-leases-never-renewed",
    "lock-scan-no-op",
    "lease-keeper-never-renewing",
    "time-limit-acknowledges",
)


def _unfenced_write(self, token, outcomes):
    """The write as it was: every outcome's image updated by its id, whoever holds it now."""
    outcomes = list({outcome.image_id: outcome for outcome in outcomes}.values())
    ids = {o.image_id for o in outcomes}
    with self.engine.begin() as conn:
        for outcome in outcomes:
            values = outcome.image_values()
            conn.execute(
                update(images)
                .where(images.c.id == bindparam("b_id"))
                .values(
                    status=values["status"],
                    error_code=values["error_code"],
                    error_message=values["error_message"],
                    paid_calls=images.c.paid_calls + values["paid_calls"],
                    not_before=values["not_before"],
                    content_hash=values["content_hash"] or images.c.content_hash,
                    copied_from=values["copied_from"],
                    claimed_by=None,
                ),
                {"b_id": outcome.image_id},
            )
        replace_faces_portable(conn, outcomes)
        copy_faces_portable(conn, outcomes)
        pictures.release(conn, token)
        scan_ids = set(
            conn.execute(images.select().with_only_columns(images.c.scan_id).where(images.c.id.in_(ids))).scalars()
        )
    return Written(frozenset(ids), frozenset(), frozenset(), frozenset(scan_ids))


def _listing_end_apart(self, part, objects, last_key, ended):
    """The page (and its part's end) committed first, the scan's listing ended after it in a
    transaction of its own, as it was."""
    new_last_key = last_key if last_key is not None else part.last_key
    with self.engine.begin() as conn:
        values: dict = dict(claimed_at=utcnow(), last_key=new_last_key)
        if ended:
            values["status"] = "done"
        held = conn.execute(
            update(listing_parts)
            .where(
                listing_parts.c.id == part.id,
                listing_parts.c.claimed_by == part.token,
                listing_parts.c.status == "queued",
                listing_parts.c.last_key.is_not_distinct_from(part.last_key),
            )
            .values(**values)
        ).rowcount
        if not held:
            return self._replayed(conn, part, new_last_key, ended)
        self._record(conn, part, objects, ended=False)
    if ended:
        with self.engine.begin() as conn:
            scan_states.lock_scan(conn, part.scan_id)
            scan_states.end_listing_if_parts_ended(conn, part.scan_id)
        scan_states.Scans(self.engine).finish_if_drained([part.scan_id])
    return dataclasses.replace(part, last_key=new_last_key)


def _releasing_every_claim(repair):
    def repair_releasing(self, scan_id):
        with self.engine.begin() as conn:
            conn.execute(
                update(images).where(images.c.scan_id == scan_id, images.c.status == "queued").values(claimed_by=None)
            )
        return repair(self, scan_id)

    return repair_releasing


def _taking_held(record):
    def record_taking_held(self, conn, *arguments, **options):
        import worker.queue.images as image_states

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(image_states, "in_a_live_scan", lambda now, lease: false())
            return record(ImageQueue(self.engine, lease_seconds=0), conn, *arguments, **options)

    return record_taking_held


def _reading_any_version(read):
    def read_any(self, bucket, key, etag=None):
        return read(self, bucket, key)

    return read_any


def _acknowledging_at_time_limits(make_celery):
    def make(settings):
        app = make_celery(settings)
        app.conf.task_acks_on_timeout = True
        return app

    return make


@contextmanager
def applied(mutation: str | None) -> Iterator[None]:
    import tests.simulation.celery_model
    import worker.batch
    import worker.queue.images as image_states
    from worker.queue import leases
    from worker.queue.scans import Scans
    from worker.sources import S3Reader

    with ExitStack() as stack:
        patch = stack.enter_context(pytest.MonkeyPatch.context())
        if mutation == "unfenced-write":
            patch.setattr(ImageQueue, "write", _unfenced_write)
        elif mutation == "listing-end-apart":
            patch.setattr(ListingParts, "record_page", _listing_end_apart)
        elif mutation == "resume-releases-claims":
            patch.setattr(Scans, "repair", _releasing_every_claim(Scans.repair))
        elif mutation == "scan-takes-held-images":
            patch.setattr(ImageQueue, "record", _taking_held(ImageQueue.record))
        elif mutation == "read-any-version":
            patch.setattr(S3Reader, "read", _reading_any_version(S3Reader.read))
        elif mutation == "no-listing-help":
            patch.setattr(worker.batch, "_help_list", lambda scan_id, context, token, **options: False)
        elif mutation == "write-without-claim-guard":
            unguarded = image_states._POSTGRESQL_UPDATE_IMAGES.replace(" AND images.claimed_by = %(token)s", "")
            assert unguarded != image_states._POSTGRESQL_UPDATE_IMAGES
            patch.setattr(image_states, "_POSTGRESQL_UPDATE_IMAGES", unguarded)
        elif mutation == "image-leases-never-renewed":
            patch.setattr(image_states, "renew", lambda conn, tokens, now: None)
        elif mutation == "lock-scan-no-op":
            patch.setattr(scan_states, "lock_scan", lambda conn, scan_id: None)
        elif mutation == "lease-keeper-never-renewing":
            patch.setattr(leases, "renew_all", lambda engine, tokens: None)
        elif mutation == "time-limit-acknowledges":
            model = tests.simulation.celery_model
            patch.setattr(model, "make_celery", _acknowledging_at_time_limits(model.make_celery))
        elif mutation is not None:
            raise ValueError(f"unknown mutation {mutation!r}; one of {', '.join(MUTATIONS)}")
        yield
