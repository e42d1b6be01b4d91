"""`--help` of every `bgq` command and subcommand says what its source says.

Typer renders help with Rich, which takes a bare `[...]` for markup and drops it: a help text
`rembg model [default: BGQ_MODEL].` came out as `rembg model .`. The help texts write it as
`producer.cli.common.shown_default` does (escaped); these tests find every command at run time,
so a new command or flag is checked too.
"""

from __future__ import annotations

import re

import pytest
import typer.main
from typer.testing import CliRunner

from producer.cli import app

ROOT = typer.main.get_command(app)


def commands(group: object = ROOT, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The path of every command and group under `group`, itself included."""
    found = [path]
    for name, command in getattr(group, "commands", {}).items():
        found += commands(command, (*path, name))
    return found


def command_at(path: tuple[str, ...]) -> object:
    command: object = ROOT
    for name in path:
        command = command.commands[name]  # type: ignore[attr-defined]
    return command


def meant(text: str) -> str:
    """A help text as its author meant it shown: escaped brackets as brackets, one space."""
    return " ".join(text.replace("\\[", "[").split())


def shown(path: tuple[str, ...]) -> str:
    """`bgq PATH --help`, unwrapped (a wide terminal), box drawing and runs of spaces as one."""
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "1000"}, prog_name="bgq")
    assert result.exit_code == 0, (path, result.output)
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())


def test_every_command_is_found() -> None:
    found = commands()
    assert {("submit",), ("ingest",), ("models", "fetch"), ("cache", "prune")} <= set(found)
    assert len(found) >= 14


@pytest.mark.parametrize("path", commands(), ids=lambda path: " ".join(("bgq", *path)))
def test_help_shows_every_text_whole(path: tuple[str, ...]) -> None:
    text = shown(path)
    assert not re.search(r" \.(?![\w./])", text), text  # a sentence whose brackets vanished
    command = command_at(path)
    docstring = getattr(command, "help", None) or ""
    first = meant(docstring.split("\n\n")[0])
    assert first in text, (first, text)
    for param in getattr(command, "params", []):
        help_text = getattr(param, "help", None)
        if help_text:
            assert meant(help_text) in text, (param.name, meant(help_text), text)
