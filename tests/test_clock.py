"""One clock for leases: the database server's, whatever this machine's says."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
from sqlalchemy import text

from worker import clock
from worker.database import align_clock, engine_for


def test_a_machine_whose_clock_is_minutes_off_dates_its_leases_by_the_servers(postgres_url):
    """A worker whose clock runs 7 minutes ahead measures the difference when it connects and dates
    its leases (and every deadline) by the server's clock from then on."""
    skewed = clock.SystemClock(time_source=lambda: time.time() + 420)
    with clock.using(skewed):
        assert (clock.utcnow() - datetime.now(UTC)).total_seconds() == pytest.approx(420, abs=1)
        engine = engine_for(postgres_url)
        try:
            with engine.connect() as conn:  # the first connection measures the offset
                server = conn.execute(text("SELECT clock_timestamp()")).scalar_one()
            assert skewed.offset == pytest.approx(-420, abs=1)
            assert abs((clock.utcnow() - server).total_seconds()) < 1
            before = skewed.aligned_at
            align_clock(engine)  # measured again only once REALIGN_SECONDS passed
            assert skewed.aligned_at == before
            align_clock(engine, every=0)
            assert skewed.aligned_at != before and abs((clock.utcnow() - datetime.now(UTC)).total_seconds()) < 1
        finally:
            engine.dispose()


def test_sqlite_shares_this_machines_clock(tmp_path):
    skewed = clock.SystemClock(time_source=lambda: time.time() + 420)
    with clock.using(skewed):
        engine = engine_for(f"sqlite:///{tmp_path / 'one-machine.db'}")
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        align_clock(engine, every=0)
        assert skewed.offset == 0 and skewed.aligned_at is None
