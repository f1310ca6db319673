"""The `reparam` CLI: init/convert/verify, exit codes, one-line errors, atomic and safe outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from reparam_cli.pipeline.deploy import load_deploy
from reparam_cli.io.safetensors import read_metadata

from .helpers import run_cli

SPEC = "repvgg-a0"
SMALL = ["--input-shape", "1,3,32,32"]


run = run_cli


@pytest.fixture(scope="module")
def a0(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "a0.pth"
    result = run("init", SPEC, "-o", path, "--seed", "3")
    assert result.exit_code == 0, result.output
    return path


def one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    assert "Traceback" not in result.stderr + result.stdout


def test_convert_writes_verified_safetensors_with_metadata(a0, tmp_path):
    out = tmp_path / "a0.deploy.safetensors"
    result = run("convert", a0, "--spec", SPEC, "-o", out, "--json", *SMALL)
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)  # exactly one JSON object on stdout
    for key in ("ok", "input", "output", "spec", "format", "blocks", "params_before", "params_after",
                "max_abs_err", "max_rel_err"):
        assert key in report
    assert report["ok"] and report["blocks"] == {"RepVGGBlock": 22}
    assert report["params_after"] == 8309384
    assert report["flops_after"] < report["flops_before"]  # the 1x1 branches are gone
    meta = read_metadata(out)
    assert meta["version"] and len(meta["source_sha256"]) == 64
    assert meta["spec"]["name"] == SPEC and meta["verification"]["max_rel_err"] == report["max_rel_err"]
    # The deploy model rebuilt from the file alone runs and matches the training model.
    deploy = load_deploy(out)
    assert {"stage0.rbr_reparam.weight", "linear.weight"} <= set(deploy.state_dict())
    result = run("verify", a0, out, "--spec", SPEC, "--json", *SMALL)
    assert result.exit_code == 0 and json.loads(result.stdout)["ok"]


def test_default_output_beside_input_and_no_overwrite(a0, tmp_path):
    ckpt = tmp_path / "model.pth"
    ckpt.write_bytes(a0.read_bytes())
    assert run("convert", ckpt, "--spec", SPEC, *SMALL).exit_code == 0
    assert (tmp_path / "model.deploy.safetensors").is_file()
    one_line_error(run("convert", ckpt, "--spec", SPEC, *SMALL), "already exists", "--overwrite")
    assert run("convert", ckpt, "--spec", SPEC, "--overwrite", *SMALL).exit_code == 0


def test_torchscript_runs_without_reparam(a0, tmp_path):
    out = tmp_path / "a0.deploy.pt"
    assert run("convert", a0, "--spec", SPEC, "-o", out, "-f", "torchscript", *SMALL).exit_code == 0
    x = torch.randn(1, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch; sys.modules['reparam_cli'] = None; "
            f"m = torch.jit.load(r'{out}'); x = torch.load(r'{tmp_path / 'x.pt'}'); "
            f"torch.save(m(x), r'{tmp_path / 'y.pt'}')")
    subprocess.run([sys.executable, "-c", code], check=True)
    expect = load_deploy_from_safetensors(a0, tmp_path)(x)
    assert torch.allclose(torch.load(tmp_path / "y.pt"), expect, rtol=1e-4, atol=1e-5)
    result = run("verify", a0, out, "--spec", SPEC, *SMALL)
    assert result.exit_code == 0, result.stderr


def load_deploy_from_safetensors(ckpt, tmp_path):
    out = tmp_path / "ref.safetensors"
    assert run("convert", ckpt, "--spec", SPEC, "-o", out, "--no-verify").exit_code == 0
    return load_deploy(out)


def test_verify_fails_on_one_altered_weight(a0, tmp_path):
    out = tmp_path / "a0.deploy.safetensors"
    assert run("convert", a0, "--spec", SPEC, "-o", out, *SMALL).exit_code == 0
    state = load_file(out)
    # A weight of a live channel: the first block reads the image itself, and the output channel with
    # the largest bias survives the ReLU. (A dead channel's weights do not change the function, and
    # verification rightly would not notice them.)
    weight, bias = state["stage0.rbr_reparam.weight"], state["stage0.rbr_reparam.bias"]
    c = int(bias.argmax())
    weight[c, 1, 1, 1] += 0.1 * weight[c].abs().max()
    bad = tmp_path / "bad.safetensors"
    from safetensors import safe_open
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    save_file(state, str(bad), metadata=meta)
    result = run("verify", a0, bad, "--spec", SPEC, "--json", *SMALL)
    assert result.exit_code == 1, result.stderr
    report = json.loads(result.stdout)
    assert not report["ok"] and report["failed_blocks"] == ["stage0"]


def test_failed_verification_leaves_no_output(a0, tmp_path):
    out = tmp_path / "never.safetensors"
    result = run("convert", a0, "--spec", SPEC, "-o", out, "--rtol", "0", "--atol", "0", *SMALL)
    assert result.exit_code == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_inputs_exit_2_with_one_line(a0, tmp_path):
    one_line_error(run("convert", tmp_path / "missing.pth", "--spec", SPEC), "not found")
    one_line_error(run("convert", a0, "--spec", "repvgg-z9"), "unknown spec")
    one_line_error(run("convert", a0, "--spec", SPEC, "-o", a0), "over its input")
    one_line_error(run("convert", a0, "--spec", SPEC, "-f", "zip"), "unknown format")
    # The wrong spec for the checkpoint: missing/unexpected keys and shape mismatches are named.
    one_line_error(run("convert", a0, "--spec", "repvgg-b0", "-o", tmp_path / "x.safetensors"),
                   "does not fit the model", "missing keys: stage1.2.")
    one_line_error(run("convert", a0, "--spec", "repvgg-a1", "-o", tmp_path / "y.safetensors"),
                   "shape mismatch: ")
    one_line_error(run("convert", a0, "--spec", SPEC, "--input-shape", "1,4,32,32", "-o", tmp_path / "w.safetensors"),
                   "cannot run on verification input (1, 4, 32, 32)", "--input-shape")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    one_line_error(run("convert", garbage, "--spec", SPEC), "cannot read")
    assert not any(p.name.startswith(("x.", "y.")) for p in tmp_path.iterdir())


def test_unexpected_keys_are_named(a0, tmp_path):
    state = torch.load(a0, weights_only=True)
    state["extra.weight"] = torch.zeros(1)
    ckpt = tmp_path / "extra.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, ckpt)
    one_line_error(run("convert", ckpt, "--spec", SPEC), "unexpected keys: extra.weight")


def test_wrapped_and_prefixed_checkpoint_loads(a0, tmp_path):
    state = torch.load(a0, weights_only=True)
    ckpt = tmp_path / "wrapped.pth"
    torch.save({"epoch": 3, "model": {f"module.{k}": v for k, v in state.items()}}, ckpt)
    result = run("convert", ckpt, "--spec", SPEC, "--json", *SMALL)
    assert result.exit_code == 0, result.stderr


def test_input_is_never_modified(a0, tmp_path):
    before = a0.read_bytes()
    run("convert", a0, "--spec", SPEC, "-o", tmp_path / "o.safetensors", *SMALL)
    assert a0.read_bytes() == before


def test_subprocess_entry_points_and_help():
    for cmd in ([sys.executable, "-m", "reparam_cli", "--help"], [sys.executable, "-m", "reparam_cli", "--version"]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0 and proc.stdout
    proc = subprocess.run([sys.executable, "-m", "reparam_cli", "convert", "nope.pth", "--spec", SPEC],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-c", "import reparam_cli.commands.app, sys; print('torch' in sys.modules)"],
                          capture_output=True, text=True)
    assert proc.stdout.strip() == "False"  # --help does not pay for importing torch


def test_deploy_files_are_byte_reproducible(a0, tmp_path):
    """Same input, same options -> the same bytes (sorted header and metadata), readable by safetensors."""
    import hashlib

    from safetensors import safe_open

    digests = []
    for name in ("one.safetensors", "two.safetensors"):
        out = tmp_path / name
        assert run("convert", a0, "--spec", SPEC, "-o", out, *SMALL).exit_code == 0
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
        with safe_open(str(out), "pt") as f:
            assert f.metadata()["format"] == "pt" and "stage0.rbr_reparam.weight" in f.keys()
    assert digests[0] == digests[1]
