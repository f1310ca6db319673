"""Every command's --help at 80 columns: no type markers like <bool>, no word cut in two by the
wrapping, the output destination stated, examples present (issue 12, item 5)."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

from reparam_cli.commands.app import app

ROOT = Path(__file__).resolve().parent.parent

COMMANDS = ["init", "convert", "verify", "specs", "batch", "inspect"]


@functools.cache
def _help(*args: str) -> str:
    """`COLUMNS=80 reparam ARGS --help`, as a user at an 80-column terminal sees it."""
    env = {**os.environ, "COLUMNS": "80", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "reparam_cli", *args, "--help"], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_fits_80_columns_without_markers_or_cut_words(command):
    text = _help(*([command] if command else []))
    assert not re.search(r"<[a-z_]+>", text), re.findall(r".*<[a-z_]+>.*", text)  # typer's <bool>, <str> markers
    assert all(len(line) <= 80 for line in text.splitlines()), text
    assert "…" not in text and "\\[" not in text
    # Every word of every option's help appears whole in the rendered text (joined lines).
    flat = " ".join(text.split())
    if command:
        for param in typer.main.get_command(app).commands[command].params:
            for word in (param.help or "").split():
                assert word in flat, f"{command} --help cuts {word!r}"


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_help_has_examples_and_says_where_output_goes(command):
    text = _help(command)
    assert "Examples:" in text
    examples = text.split("Examples:")[1].split("Arguments:")[0].split("Options:")[0]
    assert re.search(rf"^\s+reparam {command} ", examples, re.M), examples
    assert "stdout" in text and ("stderr" in text or command == "specs")


def test_specs_says_it_prints_to_stdout_and_batch_lists_every_format():
    assert "goes to stdout" in " ".join(_help("specs").split())
    flat = " ".join(_help("batch").split())
    for fmt in ("safetensors", "torchscript", "pt2", "onnx"):
        assert fmt in flat.split("--format FORMAT")[1][:200], fmt


def test_top_level_help_lists_commands_without_truncation():
    text = _help()
    for command in COMMANDS:
        line = next(line for line in text.splitlines() if line.strip().startswith(command + " "))
        assert not line.rstrip().endswith("..."), line
