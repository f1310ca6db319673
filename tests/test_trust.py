"""Trust: a deploy file's stored spec is data (never code to run), specs cannot hijack the process,
--json is strict JSON, and the engine refuses what would compute something else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from reparam_cli.pipeline.deploy import load_deploy
from reparam_cli.errors import SpecError
from reparam_cli.pipeline.inspection import inspect_checkpoint
from reparam_cli.pipeline.conversion import convert_checkpoint, init_checkpoint

from .helpers import TINY_REPVGG_YAML, restamp, run_cli

TINY = TINY_REPVGG_YAML



@pytest.fixture(scope="module")
def crafted(tmp_path_factory) -> dict[str, Path]:
    """A good deploy file and copies whose stored spec would run code that writes a marker file."""
    folder = tmp_path_factory.mktemp("crafted")
    spec = folder / "tiny.yaml"
    spec.write_text(TINY)
    ckpt = folder / "t.pth"
    init_checkpoint(str(spec), ckpt, seed=0)
    good = folder / "t.deploy.safetensors"
    convert_checkpoint(ckpt, str(spec), good, verify_output=False)
    marker = folder / "MARKER"
    evil_py = folder / "evil.py"
    evil_py.write_text(f"open({str(marker)!r}, 'w').write('ran')\n\ndef build_model():\n    raise SystemExit(0)\n")
    files = {"spec": spec, "ckpt": ckpt, "good": good, "marker": marker, "folder": folder}
    files["os_system"] = restamp(good, folder / "sys.deploy.safetensors", builder="os:system",
                                 args={"command": f"touch {marker}"})
    files["py_file"] = restamp(good, folder / "py.deploy.safetensors", builder=f"{evil_py}:build_model", args={})
    # Looks like reparam's own code but names something merely imported there.
    files["imported"] = restamp(good, folder / "imp.deploy.safetensors",
                                builder="reparam_cli.blocks.repvgg:recipe", args={})
    files["bad_args"] = restamp(good, folder / "args.deploy.safetensors",
                                args={"num_blocks": [1, 1, 1, 1], "width_multiplier": f"{evil_py}:build_model"})
    return files


CRAFTED = ["os_system", "py_file", "imported", "bad_args"]


@pytest.mark.parametrize("kind", CRAFTED)
def test_stored_spec_naming_code_runs_nothing(crafted, kind):
    path, marker = crafted[kind], crafted["marker"]
    with pytest.raises(SpecError, match="--trust-spec"):
        load_deploy(path)
    for args, stdin in ((("inspect", path), None), (("inspect", path, "--json"), None),
                        (("inspect", "-"), path.read_bytes())):
        result = run_cli(*args, stdin=stdin)
        assert result.exit_code == 2, result.output
        assert result.stderr.count("\n") == 1 and "--trust-spec" in result.stderr
    # verify and batch never consult the stored spec: the one given is used, deploy files are not inputs
    result = run_cli("verify", crafted["ckpt"], path, "--spec", crafted["spec"], "--json")
    assert result.exit_code == 0, result.output
    assert run_cli("batch", crafted["folder"], "--spec", crafted["spec"], "-o", crafted["folder"] / f"out-{kind}",
                   "-p", path.name).exit_code == 2  # no input: a deploy file is never one
    assert not marker.exists()


def test_a_stored_verification_input_hook_is_never_run(crafted):
    """The spec's `inputs` hook names code: a stored one is dropped when the file is rebuilt."""
    path = restamp(crafted["good"], crafted["folder"] / "hook.deploy.safetensors",
                   inputs=f"{crafted['folder'] / 'evil.py'}:build_model")
    model = load_deploy(path)
    assert model(torch.randn(1, 3, 32, 32)).shape[0] == 1
    assert run_cli("inspect", path, "--json").exit_code == 0
    assert not crafted["marker"].exists()


def test_explicit_spec_or_trust_spec_rebuilds(crafted):
    x = torch.randn(1, 3, 32, 32)
    want = load_deploy(crafted["good"])(x)  # the built-in builder is rebuilt from the file alone
    assert torch.allclose(load_deploy(crafted["os_system"], spec=str(crafted["spec"]))(x), want, rtol=1e-5, atol=1e-6)
    report = inspect_checkpoint(crafted["imported"], str(crafted["spec"]))
    assert report["kind"] == "deploy" and report["blocks"] == {"RepVGGBlock": 5}
    with pytest.raises(SpecError, match=r"sys\.exit"):  # trusted: the file's code runs (and exits on build)
        load_deploy(crafted["py_file"], trust_spec=True)
    assert crafted["marker"].exists()
    crafted["marker"].unlink()


NOISY = """\
import atexit, os, sys
from reparam_cli.blocks.repvgg import RepVGG
print("print at import")
os.write(1, b"raw write to fd 1 at import\\n")
atexit.register(lambda: print("print at exit"))
with open({counter!r}, "a") as f:
    f.write("imported\\n")
INPUT_SHAPE = (1, 3, 32, 32)


def build_model():
    print("print while building")
    return RepVGG(num_blocks=[1, 1, 1, 1], width_multiplier=[0.25] * 4, num_classes=10)
"""


def reparam_process(*args, cwd=None):
    """The real console entry point in a subprocess (fds, atexit and interpreter exit included)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    return subprocess.run([sys.executable, "-m", "reparam_cli", *map(str, args)], capture_output=True, env=env,
                          cwd=cwd, timeout=300)


def test_a_noisy_spec_cannot_touch_stdout(crafted, tmp_path):
    counter = tmp_path / "imports.txt"
    noisy = tmp_path / "noisy.py"
    noisy.write_text(NOISY.format(counter=str(counter)))
    done = reparam_process("convert", crafted["ckpt"], "--spec", noisy, "-o", "-", "--samples", "1")
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout[8:9] == b"{"  # a safetensors file and nothing else
    out = tmp_path / "piped.safetensors"
    out.write_bytes(done.stdout)
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(load_deploy(out, spec=str(crafted["spec"]))(x), load_deploy(crafted["good"])(x),
                          rtol=1e-5, atol=1e-6)
    for noise in (b"print at import", b"raw write to fd 1", b"print while building", b"print at exit"):
        assert noise in done.stderr
    assert counter.read_text() == "imported\n"  # imported once per process
    quiet_exit = tmp_path / "noisy_in_process.py"  # no atexit handler left behind in the test process
    quiet_exit.write_text(NOISY.format(counter=str(counter)).replace('atexit.register(lambda: print("print at exit"))', ""))
    result = run_cli("inspect", crafted["ckpt"], "--spec", quiet_exit, "--json")  # in-process: Python-level prints
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["blocks"] == {"RepVGGBlock": 5} and "print at import" in result.stderr


@pytest.mark.parametrize("code", ["import sys\nsys.exit(3)\n",
                                  "import argparse\nargparse.ArgumentParser().parse_args()\n",
                                  "def build_model():\n    raise SystemExit('bye')\n",
                                  "raise ValueError('first line\\nsecond line')\n"])
def test_a_spec_that_exits_or_fails_is_one_error_line(crafted, tmp_path, code):
    spec = tmp_path / "exits.py"
    spec.write_text(code)
    for args in (("convert", crafted["ckpt"], "--spec", spec, "-o", tmp_path / "o.safetensors"),
                 ("inspect", crafted["ckpt"], "--spec", spec, "--json")):
        result = run_cli(*args)
        assert result.exit_code == 2, result.output
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert json.loads(result.stdout)["ok"] is False
    assert not (tmp_path / "o.safetensors").exists()


# --------------------------------------------------------------------------- numbers never hide

def _reject(token):
    raise ValueError(f"non-strict JSON token {token}")


def test_strict_json_replaces_non_finite_numbers_and_says_why():
    from reparam_cli.core.jsonio import dumps

    text = dumps({"ok": False, "max_abs_err": float("nan"), "worst": {"err": float("-inf")}, "xs": [1.0, float("inf")]})
    data = json.loads(text, parse_constant=_reject)
    assert data["max_abs_err"] is None and data["worst"]["err"] is None and data["xs"] == [1.0, None]
    assert data["nonfinite"] == {"max_abs_err": "nan", "worst.err": "-inf", "xs[1]": "inf"}
    assert "nonfinite" not in json.loads(dumps({"ok": True, "x": 1.5}))


def _repvgg_block(dtype=torch.float32):
    from reparam_cli.blocks.repvgg import RepVGGBlock

    from .helpers import randomized

    return randomized(RepVGGBlock(4, 4)).to(dtype)


def test_fused_weights_that_overflow_the_dtype_are_an_error_even_unverified(tmp_path):
    from reparam_cli.convert.engine import reparameterize
    from reparam_cli.errors import NotEquivalent

    block = _repvgg_block(torch.float16)
    with torch.no_grad():  # finite float16 values whose fused product (300 / sqrt(1e-5) = 9.5e4) is not
        block.rbr_dense.conv.weight.fill_(300.0)
        block.rbr_dense.bn.running_var.zero_()
        block.rbr_dense.bn.weight.fill_(1.0)
    assert all(torch.isfinite(t).all() for t in block.state_dict().values())
    with pytest.raises(NotEquivalent, match=r"block <root> \(RepVGGBlock\): .*non-finite .*float16"):
        reparameterize(block)


def test_batchnorm_with_non_positive_variance_is_refused_naming_the_block():
    from torch import nn

    from reparam_cli.convert.engine import reparameterize
    from reparam_cli.errors import NotEquivalent

    net = nn.Sequential(nn.Identity(), _repvgg_block())
    with torch.no_grad():
        net[1].rbr_1x1.bn.running_var[2] = -1.0
    with pytest.raises(NotEquivalent, match=r"block 1 \(RepVGGBlock\): BatchNorm2d has running_var \+ eps <= 0 in 1"):
        reparameterize(net)


def test_training_mode_converts_the_eval_function_and_says_so():
    from torch import nn

    from reparam_cli.convert.engine import reparameterize

    net = nn.Sequential(_repvgg_block(), nn.Dropout(0.5), nn.BatchNorm2d(4)).train()
    x = torch.randn(2, 4, 6, 6)
    with pytest.warns(UserWarning, match="training mode"):
        deploy, report = reparameterize(net)
    assert not any(m.training for m in deploy.modules()) and "eval-mode" in report.notes[0]
    assert net.training  # the input is left as it was
    with torch.no_grad():
        assert torch.allclose(deploy(x), net.eval()(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- block geometry, more dtypes

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _stack(kind: str, c: int, groups: int, stride: int, k: int):
    """Two blocks of one family back to back: (N, c*groups, H, W) -> (N, c*groups, H', W')."""
    from torch import nn

    from reparam_cli.blocks.acnet import ACBlock
    from reparam_cli.blocks.dbb import DiverseBranchBlock
    from reparam_cli.blocks.repvgg import RepVGGBlock

    w = c * groups
    make = {"repvgg": lambda s: RepVGGBlock(w, w, 3, s, 1, groups=groups),
            "acnet": lambda s: ACBlock(w, w, k, s, k // 2, groups=groups),
            "dbb": lambda s: DiverseBranchBlock(w, w, k, s, groups=groups)}[kind]
    return nn.Sequential(make(stride), make(1))


@settings(max_examples=24, deadline=None, derandomize=True)
@given(kind=st.sampled_from(["repvgg", "acnet", "dbb"]), c=st.integers(1, 3), groups=st.sampled_from([1, 2]),
       stride=st.integers(1, 2), k=st.sampled_from([3, 5]), training=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_stacked_blocks_any_dtype_and_mode(kind, c, groups, stride, k, training, dtype):
    """Stacked blocks in float32/float16/bfloat16, in eval or training mode: the deploy model (in
    eval mode) computes the eval-mode function of the exact low-precision weights, to the rounding
    of the fused weights in that dtype (compared in float64, so no half-precision kernels decide)."""
    import warnings

    from reparam_cli.convert.engine import reparameterize

    from .helpers import randomized

    net = randomized(_stack(kind, c, groups, stride, k), seed=c + 7 * groups).to(dtype).train(training)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        deploy, report = reparameterize(net)
    assert len(report.converted) == 2 and not any(m.training for m in deploy.modules())
    assert {p.dtype for p in deploy.parameters()} == {dtype}
    x = torch.randn(2, c * groups, 9, 8, dtype=torch.float64)
    with torch.no_grad():
        ref = net.double().eval()(x)
        out = deploy.double()(x)
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    assert rel < {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype], rel
