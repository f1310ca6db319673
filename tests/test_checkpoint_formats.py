"""Reading real-world checkpoints: file formats, wrappers, prefixes, EMA, half precision, checkpoints
already in deploy form, and pickles that would run code."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from reparam_cli.io.checkpoint import extract_checkpoint
from reparam_cli.convert.engine import reparameterize
from reparam_cli.errors import CheckpointError
from reparam_cli.pipeline.deploy import load_deploy
from reparam_cli.pipeline.specs import load_spec

from .helpers import randomized, run_cli

TINY_SPEC = """\
name: tiny-repvgg
builder: reparam_cli.blocks.repvgg:RepVGG
args: {num_blocks: [1, 2, 1, 1], width_multiplier: [0.125, 0.125, 0.125, 0.125], num_classes: 5}
input_shape: [2, 3, 32, 32]
"""


run = run_cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(spec path, training state dict with random weights and BN statistics, float64 reference model)."""
    root = tmp_path_factory.mktemp("tiny")
    spec_path = root / "tiny.yaml"
    spec_path.write_text(TINY_SPEC)
    model = randomized(load_spec(str(spec_path)).build(), seed=5)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return spec_path, state, model.double().eval()


def convert(spec_path, ckpt: Path, *extra):
    out = ckpt.with_name(ckpt.name + ".deploy.safetensors")
    result = run("convert", ckpt, "--spec", spec_path, "-o", out, "--json", *extra)
    return result, out


def assert_matches(out: Path, reference: torch.nn.Module, rtol: float = 1e-5) -> torch.nn.Module:
    deploy = load_deploy(out)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = reference(x.double())
        got = deploy(x.to(next(deploy.parameters()).dtype)).double()
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    assert err < rtol, err
    return deploy


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin", ".safetensors"])
def test_plain_state_dict_in_every_file_format(tiny, tmp_path, suffix):
    spec_path, state, ref = tiny
    ckpt = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(ckpt))
    else:
        torch.save(state, ckpt)
    result, out = convert(spec_path, ckpt)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["blocks"] == {"RepVGGBlock": 6}
    assert_matches(out, ref)


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "model_state_dict", "ema", "model_ema",
                                     "state_dict_ema"])
@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod."])
def test_wrappers_and_prefixes_are_unwrapped(tiny, wrapper, prefix):
    _, state, _ = tiny
    model = load_spec(str(tiny[0])).build(device="meta")
    obj = {"epoch": 7, "optimizer": {"lr": 0.1}, wrapper: {prefix + k: v for k, v in state.items()}}
    ckpt = extract_checkpoint(obj, expected=model.state_dict().keys())
    assert ckpt.state.keys() == state.keys() and ckpt.wrappers == [wrapper] and ckpt.prefix == prefix
    assert all(torch.equal(ckpt.state[k], v) for k, v in state.items())
    if wrapper in ("ema", "model_ema", "state_dict_ema"):
        assert any("only EMA weights" in n for n in ckpt.notes)


def test_lightning_ckpt_with_model_prefix_and_other_modules(tiny, tmp_path):
    spec_path, state, ref = tiny
    lightning = {
        "epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0",
        "state_dict": {**{f"model.{k}": v for k, v in state.items()}, "criterion.weight": torch.ones(5)},
        "optimizer_states": [], "lr_schedulers": [], "hyper_parameters": {"lr": 0.01},
    }
    ckpt = tmp_path / "epoch=3-step=120.ckpt"
    torch.save(lightning, ckpt)
    result, out = convert(spec_path, ckpt)
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert any("'model.'" in n and "criterion.weight" in n for n in report["notes"])
    assert_matches(out, ref)


def test_ema_weights_chosen_with_flag_and_noted_without(tiny, tmp_path):
    spec_path, state, ref = tiny
    other = {k: (v * 0.5 if v.is_floating_point() else v) for k, v in state.items()}  # the "EMA" copy
    ckpt = tmp_path / "timm_train.pth.tar"
    # Like timm's train.py: weights, EMA weights, and the argparse arguments (allowed under weights_only).
    torch.save({"epoch": 1, "arch": "tiny", "state_dict": other, "state_dict_ema": {f"module.{k}": v for k, v in
                                                                                      state.items()},
                "args": argparse.Namespace(lr=0.1, model="tiny")}, ckpt)
    result, out = convert(spec_path, ckpt, "--ema")
    assert result.exit_code == 0, result.stderr
    assert any("EMA" in n for n in json.loads(result.stdout)["notes"])
    assert_matches(out, ref)  # the EMA weights are `state`
    result, out2 = convert(spec_path, ckpt, "-o", tmp_path / "plain.safetensors")
    assert result.exit_code == 0, result.stderr
    assert any("pass --ema" in n for n in json.loads(result.stdout)["notes"])
    deploy = load_deploy(tmp_path / "plain.safetensors")
    assert not torch.equal(deploy.state_dict()["linear.weight"], load_deploy(out).state_dict()["linear.weight"])
    # --ema on a checkpoint without EMA weights is an error, not a silent fallback.
    plain = tmp_path / "plain.pth"
    torch.save({"state_dict": state}, plain)
    result = run("convert", plain, "--spec", spec_path, "--ema")
    assert result.exit_code == 2 and "no EMA weights" in result.stderr


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoint_keeps_its_dtype(tiny, tmp_path, dtype):
    spec_path, state, ref = tiny
    half = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    ckpt = tmp_path / "half.pth"
    torch.save(half, ckpt)
    result, out = convert(spec_path, ckpt)
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    name = str(dtype).removeprefix("torch.")
    assert report["dtype"] == report["checkpoint_dtype"] == name
    deploy = load_deploy(out)
    assert {p.dtype for p in deploy.parameters()} == {dtype}
    # Fused in float64 from the half weights: every deploy tensor is the exact fusion rounded once.
    half64 = {k: v.double() if v.is_floating_point() else v for k, v in half.items()}
    exact = reparameterize(_loaded(spec_path, half64))[0].state_dict()
    for k, v in deploy.state_dict().items():
        assert torch.equal(v, exact[k].to(v.dtype)), k
    # --dtype float32 overrides: the low-precision weights widen exactly, are fused from those exact
    # values and rounded once, so the deploy model meets float32's tolerance (not float16's).
    result, out32 = convert(spec_path, ckpt, "--dtype", "float32", "-o", tmp_path / "f32.safetensors")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["dtype"] == "float32" and report["rtol"] <= 1e-4 and report["max_rel_err"] < 1e-5
    deploy32 = load_deploy(tmp_path / "f32.safetensors")
    assert {p.dtype for p in deploy32.parameters()} == {torch.float32}
    for k, v in deploy32.state_dict().items():  # the exact fused values, rounded once to float32
        assert torch.equal(v, exact[k].to(v.dtype)), k


def _loaded(spec_path, state):
    from reparam_cli.io.checkpoint import load_into

    return load_into(load_spec(str(spec_path)).build(device="meta"), state).eval()


def test_float16_output_from_float32_checkpoint(tiny, tmp_path):
    spec_path, state, ref = tiny
    ckpt = tmp_path / "f32.pth"
    torch.save(state, ckpt)
    result, out = convert(spec_path, ckpt, "--dtype", "float16")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["dtype"] == "float16" and report["checkpoint_dtype"] == "float32" and report["rtol"] == 2e-2
    assert_matches(out, ref, rtol=2e-2)
    assert run("convert", ckpt, "--spec", spec_path, "--dtype", "int8").exit_code == 2


def test_already_deployed_inputs_are_refused(tiny, tmp_path):
    spec_path, state, _ = tiny
    ckpt = tmp_path / "train.pth"
    torch.save(state, ckpt)
    result, out = convert(spec_path, ckpt)
    assert result.exit_code == 0
    # A reparam deploy file (metadata) ...
    result = run("convert", out, "--spec", spec_path, "-o", tmp_path / "twice.safetensors")
    assert result.exit_code == 2 and "already a reparam deploy file" in result.stderr
    # ... the same tensors without metadata, wrapped and prefixed like a training checkpoint ...
    deploy_state = {f"module.{k}": v for k, v in load_deploy(out).state_dict().items()}
    bare = tmp_path / "deployed.pth"
    torch.save({"state_dict": deploy_state}, bare)
    result = run("convert", bare, "--spec", spec_path, "-o", tmp_path / "twice.safetensors")
    assert result.exit_code == 2 and "already in deploy form" in result.stderr, result.stderr
    # ... and TorchScript files.
    ts = tmp_path / "m.deploy.pt"
    assert run("convert", ckpt, "--spec", spec_path, "-f", "torchscript", "-o", ts).exit_code == 0
    result = run("convert", ts, "--spec", spec_path, "-o", tmp_path / "twice.safetensors")
    assert result.exit_code == 2 and "a TorchScript deploy file" in result.stderr
    assert not (tmp_path / "twice.safetensors").exists()
    # A checkpoint that fits neither is still reported as not fitting.
    broken = {k: v for k, v in state.items() if not k.startswith("stage1")}
    torch.save(broken, tmp_path / "broken.pth")
    result = run("convert", tmp_path / "broken.pth", "--spec", spec_path)
    assert result.exit_code == 2 and "missing keys: stage1" in result.stderr


class Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_pickle_that_runs_code_never_runs_without_trust(tiny, tmp_path):
    spec_path, state, ref = tiny
    marker = tmp_path / "PWNED"
    ckpt = tmp_path / "evil.pth"
    torch.save({"state_dict": state, "extra": Payload(marker)}, ckpt)
    assert not marker.exists()
    # The tensors are read with the payload turned into an inert placeholder, named in a note.
    result = run("convert", ckpt, "--spec", spec_path, "-o", tmp_path / "o.safetensors", "--json")
    assert result.exit_code == 0, result.stderr
    notes = " ".join(json.loads(result.stdout)["notes"])
    assert "extra (builtins.exec)" in notes and "no code run" in notes
    assert not marker.exists()
    assert_matches(tmp_path / "o.safetensors", ref)
    # verify reads training checkpoints the same way.
    result = run("verify", ckpt, tmp_path / "o.safetensors", "--spec", spec_path)
    assert result.exit_code == 0 and not marker.exists()
    # A payload that is the whole file is refused, still without running it.
    torch.save(Payload(marker), tmp_path / "whole.pth")
    result = run("convert", tmp_path / "whole.pth", "--spec", spec_path, "-o", tmp_path / "w.safetensors")
    assert result.exit_code == 2 and "builtins.exec object, not a state dict" in result.stderr
    assert "--trust-pickle" in result.stderr
    assert not marker.exists() and not (tmp_path / "w.safetensors").exists()
    # Only with the flag is it unpickled fully (and the code runs: that is what the flag means).
    result = run("convert", ckpt, "--spec", spec_path, "-o", tmp_path / "o2.safetensors", "--trust-pickle")
    assert result.exit_code == 0, result.stderr
    assert marker.exists()
    assert_matches(tmp_path / "o2.safetensors", ref)


def test_whole_pickled_model_reads_without_running_code(tiny, tmp_path):
    spec_path, state, ref = tiny
    model = load_spec(str(spec_path)).build()
    model.load_state_dict(state)
    ckpt = tmp_path / "full.pt"
    torch.save({"model": model, "ema": None}, ckpt)  # like YOLO checkpoints
    # Without trust: the pickled module's tensors are walked out of inert placeholders.
    result = run("convert", ckpt, "--spec", spec_path, "-o", tmp_path / "o.safetensors", "--json")
    assert result.exit_code == 0, result.stderr
    assert any("pickled module" in n and "RepVGG" in n for n in json.loads(result.stdout)["notes"])
    assert_matches(tmp_path / "o.safetensors", ref)
    result = run("convert", ckpt, "--spec", spec_path, "-o", tmp_path / "t.safetensors", "--trust-pickle")
    assert result.exit_code == 0, result.stderr
    assert_matches(tmp_path / "t.safetensors", ref)


def test_extract_errors_name_the_problem():
    with pytest.raises(CheckpointError, match="no 'weights' entry"):
        extract_checkpoint({"state_dict": {"a": torch.zeros(1)}}, key="weights")
    with pytest.raises(CheckpointError, match="contains no tensors"):
        extract_checkpoint({"epoch": 3})
