"""The celebscan command line run in this process, as a user types it (click's test runner)."""

from __future__ import annotations

from click.testing import CliRunner, Result

from producer.cli import cli


def celebscan(*args, env: dict[str, str] | None = None, ok: bool = True) -> Result:
    """``celebscan ARGS``; with ``ok``, fail the test (showing what it printed) unless it succeeded."""
    result = CliRunner().invoke(cli, [str(arg) for arg in args], env=env, catch_exceptions=not ok)
    if ok:
        assert result.exit_code == 0, result.output
    return result
