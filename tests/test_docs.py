"""The commands the docs show exist, with the options they are shown with."""

import json
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


@pytest.mark.parametrize("doc", ["README.md", "docs/models.md", "docs/tutorial.md"])
def test_every_command_line_in_the_docs_names_a_command_and_its_real_options(doc):
    lines = shown_commands(ROOT / doc)
    assert len(lines) >= {"README.md": 25, "docs/models.md": 3, "docs/tutorial.md": 6}[doc]  # blocks and spans read
    for words in lines:
        name, options = options_of(list(words))
        assert name, f"{doc}: `vaekit {' '.join(words)}` names no vaekit command"
        unknown = [w.split("=")[0] for w in words if w.startswith("--") and w.split("=")[0] not in options]
        assert not unknown, f"{doc}: `vaekit {' '.join(words)}`: {name} has no option {unknown}"


def paper_table_commands(path: Path) -> list[list[str]]:
    """The arguments of every `bench/paper_table.py` line in the code blocks of a Markdown file, with the
    shell variables the block sets (S="...") expanded."""
    found, inside, variables = [], False, {}
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            inside, variables = not inside, {}
            continue
        if not inside:
            continue
        setting = re.fullmatch(r'([A-Z]+)="(.*)"', line.strip())
        if setting:
            variables[setting.group(1)] = setting.group(2)
        elif "bench/paper_table.py" in line:
            expanded = re.sub(r"\$([A-Z]+)", lambda m: variables[m.group(1)], line)
            found.append(shlex.split(expanded.split("bench/paper_table.py", 1)[1]))
    return found


def test_every_paper_table_command_in_results_md_parses():
    import importlib.util

    spec = importlib.util.spec_from_file_location("paper_table", ROOT / "bench" / "paper_table.py")
    paper_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paper_table)
    commands = paper_table_commands(ROOT / "docs" / "results.md")
    assert len(commands) >= 40
    for argv in commands:
        args = paper_table.parser().parse_args(argv)  # an unknown option or a bad value exits
        assert all(r in paper_table.ROWS for r in args.rows), argv


def python_blocks(path: Path) -> list[str]:
    blocks, current = [], None
    for line in path.read_text().splitlines():
        if line.startswith("```python"):
            current = []
        elif line.startswith("```") and current is not None:
            blocks.append("\n".join(current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def test_the_readme_example_of_training_from_python_runs_as_written(tmp_path, monkeypatch):
    import numpy as np
    import torch

    import vaekit

    (block,) = [b for b in python_blocks(ROOT / "README.md") if "vaekit.fit(" in b]
    g = np.random.default_rng(0)
    stripes = np.zeros((120, 8, 8), np.uint8)
    stripes[:60, ::2] = 230
    stripes[60:, :, ::2] = 230
    np.save(tmp_path / "my_images.npy", np.clip(stripes + g.integers(0, 25, stripes.shape), 0, 255).astype(np.uint8))
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    metrics, model = scope["metrics"], scope["model"]
    assert len(metrics) == 10 and metrics[-1]["valid_nelbo"] < metrics[0]["valid_nelbo"]
    assert json.loads((tmp_path / "runs/mine/config.json").read_text())["data"]["binarize"] == "none"
    x = vaekit.from_arrays(np.load("my_images.npy")).float()[:4]
    assert not model.training and model.encode(x).mean.shape == (4, 8)


def test_the_tutorial_runs_as_written_on_stand_in_digits(tmp_path, monkeypatch):
    """docs/tutorial.md's blocks, in order in one scope, with MNIST replaced by 300 noisy
    stripe images (CI has no MNIST): its asserts are the checks; the run it trains must exist."""
    import torch

    from vaekit import data

    g = torch.Generator().manual_seed(0)
    x = (torch.rand(300, 1, 28, 28, generator=g) * 60).to(torch.uint8)
    x[:150, :, ::3] = 220
    x[150:, :, :, ::3] = 220
    y = (torch.arange(300) >= 150).long()
    fake = {"train": data.Dataset(x[:200], y[:200], "mnist-train"),
            "valid": data.Dataset(x[200:250], y[200:250], "mnist-valid"),
            "test": data.Dataset(x[250:], y[250:], "mnist-test")}
    monkeypatch.setattr(data, "load_mnist", lambda split, *a, **kw: fake[split])
    monkeypatch.setattr(data, "load_data", lambda spec, **kw: data.Splits(fake["train"], fake["valid"], fake["test"]))
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    blocks = python_blocks(ROOT / "docs" / "tutorial.md")
    assert len(blocks) == 5
    scope: dict = {}
    for block in blocks:
        exec(compile(block, "docs/tutorial.md", "exec"), scope)
    assert [m["epoch"] for m in scope["metrics"]] == [1, 2]
    assert (tmp_path / "runs" / "tutorial" / "model.safetensors").is_file()
    assert scope["line"].shape == (1, 8, 1, 28, 28)
