"""README.md tells the truth about settings and commands."""

import re
from pathlib import Path

from producer.cli import cli
from worker.settings import documented_settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_setting_is_documented():
    for env, _default, _help in documented_settings():
        assert f"`{env}`" in README, env


def test_every_command_is_documented():
    for name, command in cli.commands.items():
        names = [f"{name} {sub}" for sub in getattr(command, "commands", {})] or [name]
        for full in names:
            assert f"celebscan {full}" in README, full


def test_the_two_commands_are_marked_for_ci():
    for marker in ("demo-command", "test-command"):
        block = re.search(rf"<!-- {marker} -->\s*```sh\n(.+?)\n```\s*<!-- /{marker} -->", README, re.S)
        assert block and block.group(1).strip(), marker
