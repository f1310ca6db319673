"""Pipelines: `-` reads the checkpoint from stdin, `-o -` writes the deploy file to stdout."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, load_file
from typer.testing import CliRunner

from reparam_cli.commands.app import app
from reparam_cli.errors import CheckpointError
from reparam_cli.pipeline.deploy import load_deploy
from reparam_cli.pipeline.conversion import init_checkpoint
from reparam_cli.pipeline.training import load_training_model
from reparam_cli.pipeline.stdio import convert_stdio, spool_stdin
from reparam_cli.io.sniff import sniff_format
from reparam_cli.pipeline.specs import load_spec

# A Python spec that prints on import and while building: none of it may reach stdout.
NOISY_SPEC = """\
from reparam_cli.blocks.repvgg import RepVGG

print("noise from the spec's import")
INPUT_SHAPE = (1, 3, 32, 32)


def build_model():
    print("noise while building")
    return RepVGG(num_blocks=[1, 1, 1, 1], width_multiplier=[0.25] * 4, num_classes=10)
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipes")
    spec = folder / "noisy.py"
    spec.write_text(NOISY_SPEC)
    init_checkpoint(str(spec), folder / "a.pth", seed=1)
    init_checkpoint(str(spec), folder / "b.safetensors", seed=2)
    return folder, spec


def reparam(*args, stdin: Path | bytes | None = None) -> subprocess.CompletedProcess:
    data = stdin.read_bytes() if isinstance(stdin, Path) else stdin
    return subprocess.run([sys.executable, "-m", "reparam_cli", *map(str, args)], input=data or b"",
                          capture_output=True, timeout=120)


def assert_matches_training(deploy_bytes: bytes, checkpoint: Path, spec: Path, tmp_path: Path) -> None:
    out = tmp_path / "from_stdout.safetensors"
    out.write_bytes(deploy_bytes)
    deploy = load_deploy(out, str(spec))
    train = load_training_model(checkpoint, load_spec(str(spec)))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = train.double()(x.double()), deploy(x).double()
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


def cli(*args, stdin: Path | bytes | None = None):
    """In process (fast); the runner gives the command byte streams for stdin and stdout."""
    data = stdin.read_bytes() if isinstance(stdin, Path) else stdin
    return CliRunner().invoke(app, [str(a) for a in args], input=data or b"")


def test_stdin_to_stdout_in_a_real_pipe(setup, tmp_path):
    folder, spec = setup
    proc = reparam("convert", "-", "--spec", spec, "-o", "-", stdin=folder / "a.pth")
    assert proc.returncode == 0, proc.stderr.decode()
    tensors = load(proc.stdout)  # stdout is nothing but a valid safetensors file, despite the spec's prints
    assert "stage0.rbr_reparam.weight" in tensors
    assert_matches_training(proc.stdout, folder / "a.pth", spec, tmp_path)
    stderr = proc.stderr.decode()
    assert "noise while building" in stderr and "<stdin>" in stderr and "<stdout>" in stderr
    # Verification happens before anything is written: a failure leaves stdout empty.
    proc = reparam("convert", "-", "--spec", spec, "-o", "-", "--rtol", "0", "--atol", "0", stdin=folder / "a.pth")
    assert proc.returncode == 1 and proc.stdout == b"" and b"nothing was written" in proc.stderr


def test_safetensors_stdin_and_file_to_stdout(setup, tmp_path):
    folder, spec = setup
    result = cli("convert", "-", "--spec", spec, "-o", "-", stdin=folder / "b.safetensors")
    assert result.exit_code == 0, result.stderr
    assert_matches_training(result.stdout_bytes, folder / "b.safetensors", spec, tmp_path)
    piped = cli("convert", folder / "a.pth", "--spec", spec, "-o", "-")
    assert piped.exit_code == 0, piped.stderr
    out = tmp_path / "a.safetensors"
    result = cli("convert", "-", "--spec", spec, "-o", out, "--json", stdin=folder / "a.pth")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["input"] == "<stdin>"
    a, b = load(piped.stdout_bytes), load_file(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pipe_refusals_write_nothing_to_stdout(setup):
    folder, spec = setup
    cases = [
        (("convert", "-", "--spec", spec, "-o", "-", "--json"), folder / "a.pth", "--json cannot be combined"),
        (("convert", "-", "--spec", spec), folder / "a.pth", "pass -o FILE, or -o - for stdout"),
        (("convert", "-", "--spec", spec, "-o", "-"), b"definitely not a checkpoint", "neither a safetensors"),
        (("convert", "-", "--spec", spec, "-o", "-"), b"", "the input is empty"),
        (("convert", "-", "--spec", "repvgg-a0", "-o", "-"), folder / "a.pth", "does not fit the model"),
    ]
    for args, data, message in cases:
        result = cli(*args, stdin=data)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and result.stdout_bytes == b"", (args, result.exit_code, result.stderr)
        assert len(lines) == 1 and message in lines[0], (args, result.stderr)


def test_sniff_format():
    header = b'{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    assert sniff_format(len(header).to_bytes(8, "little") + header) == "safetensors"
    assert sniff_format(b"PK\x03\x04rest") == "torch"
    assert sniff_format(b"\x80\x02\x8a\nlegacy") == "torch"
    for bad in (b"", b"hello world, not a model", b"{" * 16):
        with pytest.raises(CheckpointError):
            sniff_format(bad)


def test_spool_and_convert_in_process(setup, tmp_path):
    """The Python API with explicit streams: a short-reading pipe is handled, the output streamed."""
    folder, spec = setup

    class Trickle(io.BytesIO):  # a pipe that hands out a few bytes at a time
        def read(self, n=-1):
            return super().read(3 if n is None or n < 0 or n > 3 else n)

    spooled = spool_stdin(tmp_path, Trickle((folder / "b.safetensors").read_bytes()))
    assert spooled.name == "stdin.safetensors" and spooled.read_bytes() == (folder / "b.safetensors").read_bytes()
    sink = io.BytesIO()
    report = convert_stdio("-", str(spec), "-", stdin=io.BytesIO((folder / "a.pth").read_bytes()), stdout=sink)
    assert report["input"] == "<stdin>" and report["output"] == "<stdout>" and report["ok"]
    assert_matches_training(sink.getvalue(), folder / "a.pth", spec, tmp_path)
