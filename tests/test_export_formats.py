"""Output formats: TorchScript, torch.export (.pt2) and ONNX files loaded back with their own
runtime and compared numerically; dtypes; `reparam verify` on every format; help and completion."""

from __future__ import annotations

import json
import shutil
import warnings

import click
import pytest
import torch
import typer

from reparam_cli.commands.app import app
from reparam_cli.pipeline.specs import load_spec

from .helpers import randomized
from .test_checkpoint_formats import TINY_SPEC, run

X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(11))  # batch 3: the spec's is 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(spec path, float32 training checkpoint, float64 reference model)."""
    root = tmp_path_factory.mktemp("export")
    spec_path = root / "tiny.yaml"
    spec_path.write_text(TINY_SPEC)
    model = randomized(load_spec(str(spec_path)).build(), seed=2)
    ckpt = root / "tiny.pth"
    torch.save(model.state_dict(), ckpt)
    return spec_path, ckpt, model.double().eval()


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).abs().max() / ref.abs().max()).item()


def _run_file(path, fmt: str, x: torch.Tensor) -> torch.Tensor:
    """Run a deploy file with its own runtime only (no reparam code)."""
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still supported
            return torch.jit.load(str(path))(x)
    if fmt == "pt2":
        return torch.export.load(str(path)).module()(x)
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("fmt,suffix,runtime", [("torchscript", ".pt", "torch.jit"), ("pt2", ".pt2", "torch.export"),
                                                ("onnx", ".onnx", "onnxruntime")])
def test_each_format_loads_back_and_matches(tiny, tmp_path, fmt, suffix, runtime):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    spec_path, ckpt, ref = tiny
    local = tmp_path / "tiny.pth"
    shutil.copy(ckpt, local)
    result = run("convert", local, "--spec", spec_path, "-f", fmt, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    out = tmp_path / f"tiny.deploy{suffix}"  # the default output name
    assert report["output"] == str(out) and out.is_file()
    assert report["format"] == fmt and report["export_runtime"] == runtime and report["export_ok"]
    assert report["export_max_rel_err"] < 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["tiny.pth", out.name])  # no temporary leftovers
    with torch.no_grad():
        got = _run_file(out, fmt, X)  # dynamic batch: exported with batch 2, run with 3
        assert _rel(got, ref(X.double())) < 1e-5
    result = run("verify", local, out, "--spec", spec_path, "--json")
    assert result.exit_code == 0, result.stderr
    verified = json.loads(result.stdout)
    assert verified["ok"] and verified["format"] == fmt and verified["max_rel_err"] < 1e-5
    assert verified["params_after"] == report["params_after"]


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_float16_exports(tiny, tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    spec_path, ckpt, ref = tiny
    out = tmp_path / f"half.{fmt}"
    result = run("convert", ckpt, "--spec", spec_path, "-f", fmt, "--dtype", "float16", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["dtype"] == "float16" and report["export_ok"]
    with torch.no_grad():
        got = _run_file(out, fmt, X.half())
    assert got.dtype == torch.float16 and _rel(got, ref(X.double())) < 2e-2
    result = run("verify", ckpt, out, "--spec", spec_path, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["dtype"] == "float16", result.stderr


def test_bfloat16_onnx_cannot_be_verified_so_is_refused(tiny, tmp_path):
    spec_path, ckpt, _ = tiny
    out = tmp_path / "bf.onnx"
    result = run("convert", ckpt, "--spec", spec_path, "-f", "onnx", "--dtype", "bfloat16", "-o", out)
    assert result.exit_code == 2 and "bfloat16" in result.stderr and "--no-verify" in result.stderr
    assert not out.exists()
    # bfloat16 works for the formats torch runs itself.
    result = run("convert", ckpt, "--spec", spec_path, "-f", "torchscript", "--dtype", "bfloat16",
                 "-o", tmp_path / "bf.pt", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["rtol"] == 8e-2, result.stderr


def test_exported_file_that_disagrees_is_not_written(tiny, tmp_path, monkeypatch):
    """The round-trip check runs before the rename: a runtime giving other numbers aborts the write."""
    import reparam_cli.pipeline.conversion as pipeline

    real = pipeline.compare_exported

    class Shifted(torch.nn.Module):
        def __init__(self, deploy):
            super().__init__()
            self.deploy = deploy

        def forward(self, t):
            return self.deploy(t) * 1.01  # 1% off: far beyond the 1e-4 tolerance

    def compare_against_shifted_deploy(path, fmt, deploy, x, rtol, atol):
        return real(path, fmt, Shifted(deploy), x, rtol, atol)

    monkeypatch.setattr(pipeline, "compare_exported", compare_against_shifted_deploy)
    spec_path, ckpt, _ = tiny
    out = tmp_path / "m.pt2"
    result = run("convert", ckpt, "--spec", spec_path, "-f", "pt2", "-o", out, "--json")
    assert result.exit_code == 1, result.stderr
    report = json.loads(result.stdout)
    assert not report["ok"] and not report["export_ok"] and report["export_max_rel_err"] > 0.009
    assert list(tmp_path.iterdir()) == []


def test_verify_detects_a_wrong_onnx_file(tiny, tmp_path):
    pytest.importorskip("onnxruntime")
    spec_path, ckpt, _ = tiny
    other = tmp_path / "other.pth"
    torch.save(randomized(load_spec(str(spec_path)).build(), seed=9).state_dict(), other)
    out = tmp_path / "other.onnx"
    assert run("convert", other, "--spec", spec_path, "-f", "onnx", "-o", out).exit_code == 0
    result = run("verify", ckpt, out, "--spec", spec_path, "--json")
    assert result.exit_code == 1 and not json.loads(result.stdout)["ok"]


def _commands():
    group = typer.main.get_command(app)
    yield "reparam", group
    for name, command in group.commands.items():
        yield name, command


def test_every_option_of_every_command_has_help():
    missing = [f"{name} {param.opts}" for name, command in _commands() for param in command.params
               if isinstance(param, click.Option) and not (param.help or "").strip()]
    assert missing == []
    for name, command in _commands():
        if name != "reparam":
            assert (command.help or "").strip(), name
            for param in command.params:
                if isinstance(param, click.Argument):
                    assert getattr(param, "help", None), (name, param.name)


def test_version_and_shell_completion():
    result = run("--version")
    assert result.exit_code == 0 and result.stdout.startswith("reparam ")
    result = run("--help")
    assert "--install-completion" in result.stdout and "--show-completion" in result.stdout


def test_onnx_metadata_props_are_written_and_checked_file_is_what_is_published(tmp_path):
    """write_onnx's `metadata(dynamic dims)` entries land in the file's metadata_props (what a
    library's runtime reads, e.g. ultralytics'), before the check runs on the finished file; the
    exported graph still computes the module (relative 1e-6)."""
    import onnx
    import onnxruntime as ort

    from reparam_cli.io.export import write_onnx

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = {}

    def check(tmp):
        seen.update({p.key: p.value for p in onnx.load(str(tmp)).metadata_props})

    out = tmp_path / "m.onnx"
    dims = write_onnx(out, model, x, check=check, dynamic="none",
                      metadata=lambda d: {"task": "detect", "dims": str(d), "names": str({0: "a"})})
    written = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert dims == [] and written == seen == {"task": "detect", "dims": "[]", "names": "{0: 'a'}"}
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        assert _rel(torch.from_numpy(got), model(x).double()) < 1e-6


def test_folder_output_is_atomic_and_replaces_only_a_save_pretrained_folder(tmp_path):
    """write_folder publishes the folder only once `check` passes (no temporary left either way);
    an existing folder is replaced only with overwrite, and only when it holds nothing but what
    save_pretrained writes."""
    from reparam_cli.errors import OutputError
    from reparam_cli.io.export import write_folder

    def fill(folder):
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"x")

    def refuse(folder):
        raise OutputError("no")

    out = tmp_path / "out"
    with pytest.raises(OutputError, match="no"):
        write_folder(out, fill, refuse)
    assert list(tmp_path.iterdir()) == []
    write_folder(out, fill)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    with pytest.raises(OutputError, match="already exists"):
        write_folder(out, fill)
    write_folder(out, lambda f: (f / "config.json").write_text('{"new": 1}'), overwrite=True)
    assert (out / "config.json").read_text() == '{"new": 1}' and not (out / "model.safetensors").exists()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="notes.txt"):
        write_folder(out, fill, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and [p.name for p in tmp_path.iterdir()] == ["out"]
