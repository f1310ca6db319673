"""`reparam inspect`: what a checkpoint holds and what converting it would do, computing nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from reparam_cli.convert import engine
from reparam_cli.core.tensors import count_parameters
from reparam_cli.convert.engine import reparameterize
from reparam_cli.pipeline.inspection import inspect_checkpoint
from reparam_cli.pipeline.conversion import convert_checkpoint, init_checkpoint
from reparam_cli.pipeline.specs import load_spec

from .helpers import run_cli

TINY = """\
name: tiny-repvgg
builder: reparam_cli.blocks.repvgg:RepVGG
args: {num_blocks: [1, 2, 1, 1], width_multiplier: [0.25, 0.25, 0.25, 0.25], num_classes: 10}
input_shape: [1, 3, 32, 32]
"""


run = run_cli


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inspect")
    spec = folder / "tiny.yaml"
    spec.write_text(TINY)
    ckpt = folder / "t.pth"
    init_checkpoint(str(spec), ckpt, seed=0)
    # The same weights in float16 safetensors under a `module.` prefix.
    state = torch.load(ckpt, weights_only=True)
    half = {f"module.{k}": (v.half() if v.is_floating_point() else v) for k, v in state.items()}
    save_file(half, str(folder / "t16.safetensors"))
    deploy = folder / "t.deploy.safetensors"
    convert_checkpoint(ckpt, str(spec), deploy)
    return {"spec": spec, "ckpt": ckpt, "half": folder / "t16.safetensors", "deploy": deploy}


def test_without_spec(files):
    result = run("inspect", files["ckpt"], "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    model = load_spec(str(files["spec"])).build()
    state = model.state_dict()
    assert report["format"] == "torch" and report["kind"] == "training"
    assert report["tensors"] == len(state) and report["size_bytes"] == files["ckpt"].stat().st_size
    assert report["dtypes"] == {"float32": sum(v.is_floating_point() for v in state.values()),
                                "int64": sum(k.endswith("num_batches_tracked") for k in state)}
    assert report["parameters"] == count_parameters(model)  # BatchNorm statistics are not parameters
    assert report["elements"] == sum(v.numel() for v in state.values())
    assert "blocks" not in report and "params_after" not in report
    half = json.loads(run("inspect", files["half"], "--json").stdout)
    assert half["format"] == "safetensors" and set(half["dtypes"]) == {"float16", "int64"}
    assert half["parameters"] == report["parameters"]


def test_with_spec_lists_blocks_and_parameters(files, monkeypatch):
    spec = load_spec(str(files["spec"]))
    model = spec.build()
    deploy, conv = reparameterize(model.eval())
    # Nothing heavy: every recipe runs on the meta device.
    devices = []
    original = engine._fuse

    def spy(recipe, block, path):
        devices.append(next(block.parameters()).device.type)
        return original(recipe, block, path)

    monkeypatch.setattr(engine, "_fuse", spy)
    for path in (files["ckpt"], files["half"]):
        before = set(path.parent.iterdir())
        result = run("inspect", path, "--spec", files["spec"], "--json")
        assert result.exit_code == 0, result.stderr
        assert set(path.parent.iterdir()) == before  # nothing written
        report = json.loads(result.stdout)
        assert report["spec"] == "tiny-repvgg" and report["blocks"] == {"RepVGGBlock": 6}
        assert report["params_before"] == count_parameters(model)
        assert report["params_after"] == count_parameters(deploy) < report["params_before"]
        assert [b["path"] for b in report["block_list"]] == conv.paths
        for b in report["block_list"]:
            assert b["type"] == "RepVGGBlock" and b["family"] == "repvgg"
            assert b["params_before"] == count_parameters(model.get_submodule(b["path"]))
            assert b["params_after"] == count_parameters(deploy.get_submodule(b["path"])) < b["params_before"]
        # The savings are all in the blocks.
        saved = sum(b["params_before"] - b["params_after"] for b in report["block_list"])
        assert saved == report["params_before"] - report["params_after"]
    assert devices and set(devices) == {"meta"}


def test_deploy_file_uses_its_stored_spec(files):
    report = json.loads(run("inspect", files["deploy"], "--json").stdout)
    assert report["kind"] == "deploy" and report["spec"] == "tiny-repvgg"
    assert report["reparam"]["verified"] and report["reparam"]["max_rel_err"] < 1e-4
    from reparam_cli.io.checkpoint import sha256_file

    assert report["reparam"]["source_sha256"] == sha256_file(files["ckpt"])
    training = json.loads(run("inspect", files["ckpt"], "--spec", files["spec"], "--json").stdout)
    assert report["params_after"] == report["parameters"] == training["params_after"]
    assert report["block_list"] == training["block_list"]


def test_stdin_and_human_output(files):
    result = run("inspect", "-", "--spec", files["spec"], stdin=files["ckpt"].read_bytes())
    assert result.exit_code == 0 and result.stdout == ""  # tables go to stderr
    for text in ("<stdin>", "RepVGGBlock x6", "re-parameterizable blocks", "stage2.1", "repvgg"):
        assert text in result.stderr, text
    report = inspect_checkpoint("-", str(files["spec"]), stdin=open(files["half"], "rb"))
    assert report["input"] == "<stdin>" and report["format"] == "safetensors"


def test_bad_inputs_exit_2(files, tmp_path):
    for args, fragment in [
        ((tmp_path / "missing.pth",), "not found"),
        ((files["ckpt"], "--spec", "repvgg-a0"), "does not fit the model"),
        ((files["ckpt"], "--spec", "nope"), "unknown spec"),
    ]:
        result = run("inspect", *args, "--json")
        assert result.exit_code == 2 and json.loads(result.stdout)["ok"] is False
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0], result.stderr
    garbage = tmp_path / "g.pth"
    garbage.write_bytes(b"garbage, not a checkpoint")
    assert "neither a safetensors" in run("inspect", garbage).stderr
