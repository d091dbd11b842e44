"""The commands the docs show exist, with the options they are shown with."""

import re
import shlex
from pathlib import Path

import pytest
import typer.main

from vaekit.cli import app

ROOT = Path(__file__).parents[1]


def shown_commands(path: Path) -> list[list[str]]:
    """Every `vaekit ...` (or `.venv/bin/vaekit ...`) of a Markdown file: the lines of its fenced code
    blocks, and its inline code spans."""
    found, inside = [], False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            inside = not inside
            continue
        match = re.match(r"(?:\.venv/bin/)?vaekit (.*)", line.strip())
        if inside and match:
            found.append(shlex.split(match.group(1).split("  #")[0].split(" # ")[0]))
        elif not inside:
            found += [span.split() for span in re.findall(r"`(?:\.venv/bin/)?vaekit ([^`]*)`", line)]
    return found


def options_of(words: list[str]) -> tuple[str, set[str]]:
    """The (sub)command the words name and the option names it takes, from the CLI itself."""
    command, name = typer.main.get_command(app), []
    while hasattr(command, "commands") and words and words[0] in command.commands:
        command = command.commands[words[0]]
        name.append(words.pop(0))
    return " ".join(name), {"--help"} | {opt for p in command.params for opt in p.opts + p.secondary_opts}


@pytest.mark.parametrize("doc", ["README.md", "docs/models.md"])
def test_every_command_line_in_the_docs_names_a_command_and_its_real_options(doc):
    lines = shown_commands(ROOT / doc)
    assert len(lines) >= {"README.md": 25, "docs/models.md": 3}[doc]  # the code blocks and spans are read
    for words in lines:
        name, options = options_of(list(words))
        assert name, f"{doc}: `vaekit {' '.join(words)}` names no vaekit command"
        unknown = [w.split("=")[0] for w in words if w.startswith("--") and w.split("=")[0] not in options]
        assert not unknown, f"{doc}: `vaekit {' '.join(words)}`: {name} has no option {unknown}"
