"""Pictures in flight: pay once per picture, also while its copies are being worked on.

The same picture (the same bytes: MD5 and size) often lives under several keys (``2024/``,
``backup/2024/``, ``shared/alice/``). Once one of its images is ``done``, the others copy that
result (``worker/batch.py``). While one is being recognized, a copy in another worker's batch
would pay again; so before a paid call a holder takes the picture here (``INSERT ... ON CONFLICT
DO NOTHING``, or over a holder whose lease ran out), and a copy that finds it taken waits a few
seconds and then copies the result. The row goes with the holder's write (in its transaction), or
with its release; a holder that crashed holds it only until its lease runs out.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Engine, delete, select, update

from worker.database import utcnow
from worker.retry import retry_database
from worker.schema import pictures
from worker.sql import dialect_insert


@dataclass(frozen=True)
class Picture:
    backend: str
    content_hash: str
    size: int


class PictureLocks:
    def __init__(self, engine: Engine, lease_seconds: float) -> None:
        self.engine = engine
        self.lease = timedelta(seconds=lease_seconds)

    @retry_database
    def take(self, picture: Picture, token: str) -> bool:
        """Hold ``picture`` for ``token``'s call; False when another live holder has it."""
        now = utcnow()
        key = (
            pictures.c.backend == picture.backend,
            pictures.c.content_hash == picture.content_hash,
            pictures.c.size == picture.size,
        )
        with self.engine.begin() as conn:
            conn.execute(
                dialect_insert(self.engine, pictures)
                .values(
                    backend=picture.backend,
                    content_hash=picture.content_hash,
                    size=picture.size,
                    holder=token,
                    held_at=now,
                )
                .on_conflict_do_nothing()
            )
            conn.execute(  # a holder whose lease ran out (it crashed) gives way
                update(pictures)
                .where(*key, pictures.c.holder != token, pictures.c.held_at < now - self.lease)
                .values(holder=token, held_at=now)
            )
            holder = conn.execute(select(pictures.c.holder).where(*key)).scalar()
        return holder == token


def renew(conn, tokens: list[str], now) -> None:
    conn.execute(update(pictures).where(pictures.c.holder.in_(tokens)).values(held_at=now))


def release(conn, *tokens: str) -> None:
    """Let go of every picture the ``tokens`` hold (in the transaction that writes their results)."""
    conn.execute(delete(pictures).where(pictures.c.holder.in_(tokens)))
