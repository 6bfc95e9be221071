"""Statements that differ between SQLite and PostgreSQL, chosen by the engine's dialect."""

from __future__ import annotations

from sqlalchemy import Engine


def dialect_insert(engine: Engine, table):
    """An INSERT that supports ``on_conflict_do_nothing`` on the engine's dialect."""
    from sqlalchemy.dialects import postgresql, sqlite

    return (postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert)(table)
