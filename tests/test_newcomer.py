"""First contact (issue 12): fast, torch-free answers to bad input, suggestions for unknown specs and
misfitting checkpoints, install hints that work, the --plot figure, public API names, shape-only inspect."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reparam_cli import extras
from reparam_cli.pipeline.specs import layout_hint, load_spec, suggest_spec_names

from .helpers import run_cli

ROOT = Path(__file__).resolve().parent.parent
DIGITS_SPEC = str(ROOT / "examples" / "digits-repvgg.yaml")
DIGITS = str(ROOT / "examples" / "digits-repvgg.safetensors")


def _cli_subprocess(*args: str, code: str = "") -> subprocess.CompletedProcess:
    """Run `reparam ARGS` in a fresh interpreter, then report on stderr whether torch was imported."""
    script = ("import sys\nfrom reparam_cli.commands.app import main\nsys.argv = ['reparam', *sys.argv[1:]]\n"
              "try:\n    main()\nexcept SystemExit as exc:\n    code = exc.code\n"
              "print('TORCH_IMPORTED', 'torch' in sys.modules, file=sys.stderr)\n" + code + "sys.exit(code)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=120)


def _error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("TORCH_IMPORTED")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("args, fragments", [
    (["convert", "a0.pth", "--spec", "repvgg_a0"], ["unknown spec 'repvgg_a0'", "--spec repvgg-a0", "timm:repvgg_a0"]),
    (["inspect", "nothing-here.pth"], ["checkpoint not found: nothing-here.pth"]),
    (["convert", "nothing-here.pth", "--spec", "repvgg-a0"], ["checkpoint not found"]),
    (["verify", "a.pth", "b.safetensors", "--spec", "missing.yaml"], ["spec file not found: missing.yaml"]),
    (["init", "resnet18", "-o", "x.pth"], ["--spec resnet18-acb", "--spec resnet18-dbb"]),
])
def test_bad_input_is_answered_before_torch_is_imported(tmp_path, args, fragments):
    result = _cli_subprocess(*args)
    assert result.returncode == 2
    line = _error_line(result)
    for fragment in fragments:
        assert fragment in line, line
    assert "TORCH_IMPORTED False" in result.stderr
    assert not (tmp_path / "x.pth").exists()


def test_suggestions_for_unknown_names():
    assert "--spec mobileone-s0" in suggest_spec_names("mobileone_s0")
    assert "timm:mobileone_s0" in suggest_spec_names("mobileone_s0")
    assert "timm:" not in suggest_spec_names("repvgg-a")  # not spelled like a timm model
    assert "repvgg-a0" in suggest_spec_names("repvgg-a")
    assert "reparam specs" in suggest_spec_names("zzz")


def test_missing_extra_is_reported_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(extras.EXTRAS, "onnx", ("no_such_module_for_reparam",))
    garbage = tmp_path / "a0.pth"
    garbage.write_bytes(b"not a checkpoint")  # reading it would fail with another message
    result = run_cli("convert", garbage, "--spec", "repvgg-a0", "-f", "onnx")
    assert result.exit_code == 2
    assert "--format onnx needs the onnx extra (no_such_module_for_reparam not installed)" in result.stderr
    assert "pip install no_such_module_for_reparam" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a0.pth"]


def test_missing_timm_is_reported_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(extras.EXTRAS, "timm", ("no_such_timm_for_reparam",))
    result = run_cli("convert", tmp_path / "missing.pth", "--spec", "timm:repvgg_a0")
    assert result.exit_code == 2
    assert "spec 'timm:repvgg_a0' needs the timm extra (no_such_timm_for_reparam not installed)" in result.stderr


def test_install_hints_name_commands_that_work():
    assert extras.install_hint("onnx").startswith("pip install onnx onnxruntime onnxscript")
    assert f"pip install -e '{ROOT}[timm]'" in extras.install_hint("timm")
    sources = "".join(p.read_text() for p in (ROOT / "reparam_cli").rglob("*.py"))
    assert "reparam-cli[" not in sources  # not on a package index: such a hint would fail


def test_builtin_spec_takes_builder_arguments():
    spec = load_spec("repvgg-a0?num_classes=10")
    assert spec.args["num_classes"] == 10 and spec.args["num_blocks"] == [2, 4, 14, 1]
    assert spec.build(device="meta").linear.out_features == 10
    assert load_spec(spec.source).args == spec.args  # stored in deploy files: must resolve again


def _shapes(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: torch.empty(t.shape, device="meta") for k, t in model.state_dict().items()}


def test_key_mismatch_hints_name_the_spec_that_fits():
    a0 = load_spec("repvgg-a0")
    model = a0.build(device="meta")
    ten = _shapes(load_spec("repvgg-a0?num_classes=10").build(device="meta"))
    assert layout_hint(ten, model, a0) == "its classifier has 10 outputs: use --spec 'repvgg-a0?num_classes=10'"
    three = load_spec("repvgg-a0?num_classes=3")  # the class count in the query is replaced, not repeated
    assert layout_hint(ten, three.build(device="meta"), three) == \
        "its classifier has 10 outputs: use --spec 'repvgg-a0?num_classes=10'"
    yolo = {f"model.{i}.conv.weight": torch.empty(8, 3, 3, 3, device="meta") for i in range(4)}
    assert "ultralytics" in layout_hint(yolo, model, a0)
    mobileone = _shapes(load_spec("mobileone-s0").build(device="meta"))
    assert layout_hint(mobileone, model, a0) == "its keys fit the built-in spec: use --spec mobileone-s0"
    unknown = {"encoder.layer1.weight": torch.empty(4, 4, device="meta")}
    assert layout_hint(unknown, model, a0) is None  # nothing better to say than "check the --spec"


def test_timm_layout_suggests_the_timm_spec():
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        state = _shapes(timm.create_model("repvgg_a0"))
    a0 = load_spec("repvgg-a0")
    assert layout_hint(state, a0.build(device="meta"), a0).endswith("use --spec timm:repvgg_a0")
    reference = _shapes(load_spec("repvgg-a0?num_classes=10").build(device="meta"))
    spec = load_spec("timm:repvgg_a0")
    assert layout_hint(reference, spec.build(device="meta"), spec).endswith("--spec 'repvgg-a0?num_classes=10'")


def test_mismatch_message_from_convert(tmp_path):
    ckpt = tmp_path / "digits10.pth"
    model = load_spec(f"{DIGITS_SPEC}?num_classes=7").build()
    torch.save(model.state_dict(), ckpt)
    result = run_cli("convert", ckpt, "--spec", DIGITS_SPEC)
    assert result.exit_code == 2
    assert f"use --spec '{Path(DIGITS_SPEC).resolve()}?num_classes=7'" in result.stderr


@pytest.mark.parametrize("rtol, code", [("1e-4", 0), ("1e-12", 1)])
def test_plot_is_written_when_verification_passes_and_when_it_fails(tmp_path, rtol, code):
    pytest.importorskip("matplotlib")
    out, plot = tmp_path / "d.safetensors", tmp_path / "errors.png"
    result = run_cli("convert", DIGITS, "--spec", DIGITS_SPEC, "-o", out, "--plot", plot, "--rtol", rtol, "--atol", "0")
    assert result.exit_code == code, result.stderr
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    assert out.exists() == (code == 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["errors.png"] + ["d.safetensors"] * (code == 0))


def test_plot_needs_verification(tmp_path):
    result = run_cli("convert", DIGITS, "--spec", DIGITS_SPEC, "-o", tmp_path / "d.safetensors",
                     "--plot", tmp_path / "p.png", "--no-verify")
    assert result.exit_code == 2 and "--no-verify" in result.stderr
    assert not list(tmp_path.iterdir())


def test_public_names_are_the_functions():
    import reparam_cli.pipeline.conversion  # noqa: F401  (imports the verification module)
    from reparam_cli import load_deploy, reparameterize, verify

    assert callable(verify) and verify.__module__ == "reparam_cli.verification.equivalence"
    assert callable(load_deploy) and callable(reparameterize)


def test_inspect_converts_shape_only_without_importing_dynamo_or_sympy():
    check = ("import torch\nprint('DYNAMO', 'torch._dynamo' in sys.modules, file=sys.stderr)\n"
             "print('SYMPY', 'sympy' in sys.modules, file=sys.stderr)\n"
             "import torch._dynamo\nassert callable(torch._dynamo.optimize)  # the real one still imports\n")
    result = _cli_subprocess("inspect", DIGITS, "--spec", DIGITS_SPEC, "--json", code=check)
    assert result.returncode == 0, result.stderr
    assert "DYNAMO False" in result.stderr and "SYMPY False" in result.stderr
    import json

    from reparam_cli.core.tensors import count_parameters
    from reparam_cli.convert.engine import reparameterize

    report = json.loads(result.stdout)
    assert report["params_after"] == count_parameters(reparameterize(load_spec(DIGITS_SPEC).build())[0]) == 70_122
    assert report["blocks"] == {"RepVGGBlock": 5}
