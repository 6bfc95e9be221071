"""The documentation tells the truth: README.md and docs/*.md against the code, and every path,
link, module and document that the docs and the code's comments name exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import click
import pytest

from producer import reference
from producer.cli import cli
from worker.settings import documented_settings

PROJECT = Path(__file__).resolve().parent.parent
DOCS = PROJECT / "docs"
README = (PROJECT / "README.md").read_text()
MARKDOWN = [PROJECT / "README.md", *sorted(DOCS.glob("*.md"))]
GENERATED = {DOCS / name for name in reference.render()}
HAND_WRITTEN = [path for path in MARKDOWN if path not in GENERATED]
#: The code, configuration and scripts whose comments may name files of the project.
SOURCES = sorted(
    path
    for pattern in (
        "worker/**/*.py",
        "producer/**/*.py",
        "tests/**/*.py",
        "bench/**/*.py",
        "deploy/**/*",
        ".ci/*",
        "notebooks/*.ipynb",
        "Dockerfile",
        "Procfile",
        "docker-compose.yml",
        "pyproject.toml",
    )
    for path in PROJECT.glob(pattern)
    if path.is_file() and "__pycache__" not in path.parts
)
#: A path inside the project, as the docs and comments write it: from the top, no leading "/" or "./".
PROJECT_PATH = re.compile(r"(?<![\w./-])((?:worker|producer|bench|tests|deploy|docs|notebooks|\.ci)/[\w./-]*)")
DOCUMENT_NAME = re.compile(r"(?<![\w./-])([\w-]+\.md)\b")
MODULE_NAME = re.compile(r"(?<![\w./-])((?:worker|producer|bench|tests)(?:\.\w+)+)")
README_SECTION = re.compile(r'README\s"([^"]+)"')
COMMAND_LINE = re.compile(r"^(?:\$ )?(?:ssh \S+ )?(?:sudo )?(?:[A-Z_][A-Z0-9_]*=\S+ )*celebscan\s+(\S.*)$")


def without_code_blocks(text: str) -> str:
    return re.sub(r"^ *```.*?^ *```", "", text, flags=re.S | re.M)


def code_blocks(text: str) -> list[str]:
    """The fenced code blocks, a list item's indented ones included."""
    return re.findall(r"^ *```[^\n]*\n(.*?)^ *```", text, flags=re.S | re.M)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", without_code_blocks(path.read_text()), flags=re.M)}


def relative(path: Path) -> str:
    return str(path.relative_to(PROJECT))


def test_the_two_commands_are_marked_for_ci():
    for marker in ("demo-command", "test-command"):
        block = re.search(rf"<!-- {marker} -->\s*```sh\n(.+?)\n```\s*<!-- /{marker} -->", README, re.S)
        assert block and block.group(1).strip(), marker


def test_the_readme_is_short():
    assert len(README.encode()) <= 12 * 1024, "README.md is the way in: details belong in docs/"


def test_the_readme_maps_every_doc():
    for path in MARKDOWN[1:]:
        assert f"](docs/{path.name})" in README, f"README's map of the docs lacks {path.name}"


def test_every_setting_is_in_the_settings_reference():
    settings = (DOCS / "settings.md").read_text()
    for env, _default, _help in documented_settings():
        assert f"| `{env}` |" in settings, env


def test_every_command_is_documented_by_hand():
    """In the guides, not only in the generated reference."""
    text = "\n".join(path.read_text() for path in HAND_WRITTEN)
    for name, command in cli.commands.items():
        names = [f"{name} {sub}" for sub in getattr(command, "commands", {})] or [name]
        for full in names:
            assert f"celebscan {full}" in text, full


def documented_command_lines() -> list[tuple[str, str]]:
    """(file, the words after ``celebscan``) of every command line a doc shows: in a code block or a
    code span, prompts, ``sudo`` and variable assignments before it, comments and pipes after it."""
    found = []
    for path in HAND_WRITTEN:
        text = path.read_text()
        lines = [line for block in code_blocks(text) for line in block.replace("\\\n", " ").splitlines()]
        lines += [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", without_code_blocks(text))]
        for line in lines:
            match = COMMAND_LINE.match(line.strip())
            if match:
                words = re.split(r" #| \| | > | && ", match.group(1))[0]
                found.append((path.name, words))
    return found


def test_every_documented_command_line_names_real_commands_and_options():
    lines = documented_command_lines()
    assert len(lines) > 40, "the docs show commands: the pattern must find them"
    global_options = {opt for param in cli.params for opt in param.opts + param.secondary_opts}
    for doc, line in lines:
        words = re.findall(r"[^\s\[\]]+", line)
        while words and words[0].startswith("-"):
            words = words[2:] if words[0] in ("--database-url", "--endpoint-url") else words[1:]
        if not words or words[0] == "...":
            continue
        command = cli.commands.get(words[0])
        assert command is not None, f"{doc}: `celebscan {line}`: no command {words[0]!r}"
        if isinstance(command, click.Group) and len(words) > 1 and not words[1].startswith("-"):
            command = command.commands.get(words[1])
            assert command is not None, f"{doc}: `celebscan {line}`: no {words[0]} command {words[1]!r}"
        options = global_options | {"--help"} | {o for p in command.params for o in p.opts + p.secondary_opts}
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", line):
            assert flag in options, f"{doc}: `celebscan {line}`: {words[0]} has no option {flag}"


def test_the_distributed_doc_shows_the_readmes_block():
    readme_block = code_blocks(README.split("## Distributed", 1)[1])[0]
    distributed = (DOCS / "distributed.md").read_text()
    assert readme_block in code_blocks(distributed.split("## By hand", 1)[1]), "docs/distributed.md differs"


def test_every_markdown_link_and_anchor_resolves():
    for path in MARKDOWN:
        for target in re.findall(r"\]\(([^)\s]+)\)", without_code_blocks(path.read_text())):
            if re.match(r"[a-z]+:", target):
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            assert linked.exists(), f"{relative(path)} links to {target}, which does not exist"
            if anchor:
                assert anchor in anchors(linked), f"{relative(path)} links to {target}: no such heading"


@pytest.mark.parametrize("path", MARKDOWN + SOURCES, ids=relative)
def test_every_file_the_project_names_exists(path):
    text = path.read_text(errors="replace")
    for named in PROJECT_PATH.findall(text):
        named = named.rstrip(".")
        assert (PROJECT / named).exists(), f"{relative(path)} names {named}, which is not in the project"
    for document in DOCUMENT_NAME.findall(text):
        places = [PROJECT / document, DOCS / document, path.parent / document]
        assert any(place.exists() for place in places), f"{relative(path)} cites {document}, not in the project"
    for section in README_SECTION.findall(text):
        assert slug(section) in anchors(PROJECT / "README.md"), (
            f"{relative(path)} cites a README section that is not there: {section!r}"
        )


def test_every_module_the_docs_name_exists():
    for path in MARKDOWN:
        for dotted in MODULE_NAME.findall(path.read_text()):
            parts = dotted.split(".")
            prefixes = [PROJECT.joinpath(*parts[:n]) for n in range(2, len(parts) + 1)]
            assert any(p.with_suffix(".py").exists() or p.is_dir() for p in prefixes), f"{path.name}: {dotted}"


def package_modules() -> list[Path]:
    return sorted(p for top in ("worker", "producer") for p in (PROJECT / top).rglob("*.py"))


def test_the_module_map_names_every_module():
    design = (DOCS / "design.md").read_text()
    module_map = design.split("## Module map", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([\w/.]+)`", module_map))
    for module in package_modules():
        name = relative(module.parent) + "/" if module.name == "__init__.py" else relative(module)
        assert name in named, f"docs/design.md's module map does not name {name}"


def test_every_module_says_what_it_owns():
    for module in package_modules():
        assert ast.get_docstring(ast.parse(module.read_text())), f"{relative(module)} has no docstring"
