"""The package's shape: imports only point down the floors, the Python API's names, extension by a
recipe mapping, one options object, `reparam --version`, and a wheel that installs anywhere."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import torch
from torch import nn

import reparam_cli
from reparam_cli import ConvertOptions, reparameterize
from reparam_cli.core import algebra as A
from reparam_cli.pipeline.options import FuseOptions

from .helpers import run_cli

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "reparam_cli"
# Floors, bottom to top: a module may import its own floor's modules and those of lower floors.
FLOORS = [
    {"errors", "extras", "_version", "core"},
    {"blocks", "models", "io"},
    {"ecosystems"},
    {"convert"},
    {"verification"},
    {"quantize"},
    {"pipeline"},
    {"commands"},
]


def _floor(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else ""
    for i, names in enumerate(FLOORS):
        if top in names:
            return i
    raise AssertionError(f"{module}: not on any floor")


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("reparam_cli."):
            found.add(node.module)
            assert node.level == 0
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("reparam_cli."))
    return found


def test_imports_only_point_down():
    """No module imports one on a higher floor (in functions too), so there can be no import circle
    between folders; within the ground floor's files the same holds by construction."""
    upward = []
    for path in PACKAGE.rglob("*.py"):
        module = "reparam_cli." + path.relative_to(PACKAGE).with_suffix("").as_posix().replace("/", ".")
        if module in ("reparam_cli.__init__", "reparam_cli.__main__"):
            continue
        for target in _imports(path):
            if _floor(target) > _floor(module):
                upward.append(f"{module} -> {target}")
    assert not upward, upward


def test_the_registry_imports_no_block():
    assert not any(t.startswith("reparam_cli.blocks.") and t != "reparam_cli.blocks.registry"
                   for t in _imports(PACKAGE / "blocks" / "registry.py"))


def test_public_api_names_resolve():
    for name in reparam_cli.__all__:
        assert getattr(reparam_cli, name) is not None, name
    assert len(reparam_cli.all_recipes()) >= 10  # the built-in families are registered


class Pair(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        return self.a(x) * 1.0 + self.b(x)


def test_a_recipe_mapping_extends_one_call_only():
    calls = []

    def fuse(block):
        calls.append(block)
        return A.to_module(A.add(A.from_module(block.a), A.from_module(block.b)))

    torch.manual_seed(0)
    model = nn.Sequential(Pair(3), nn.ReLU(), Pair(3)).eval()
    deploy, report = reparameterize(model, recipes={Pair: fuse}, graph=False)
    assert len(calls) == 2 and report.blocks == {"Pair": 2}
    assert {b.family for b in report.converted} == {"user"}
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        err = (deploy(x) - model(x)).abs().max() / model(x).abs().max()
    assert err < 1e-5  # float32 rounding; a wrong kernel is O(1)
    assert isinstance(deploy[0], nn.Conv2d)
    # Nothing was registered: without the mapping the block is not a recipe block.
    assert reparameterize(model, graph=False)[1].blocks == {}


def test_convert_options_are_one_object():
    o = ConvertOptions.of(fmt="onnx", verify_output=False, graph=False)
    assert (o.fmt, o.verify, o.fuse) == ("onnx", False, FuseOptions(graph=False))
    assert FuseOptions.from_stored(o.fuse.stored()) == o.fuse
    assert FuseOptions.from_stored({}) == FuseOptions(graph=False)  # files from before the graph pass
    with pytest.raises(reparam_cli.ReparamError, match="unknown format 'zip'"):
        ConvertOptions.of(fmt="zip")
    with pytest.raises(TypeError, match="bogus"):
        ConvertOptions.of(bogus=1)


def test_version_names_torch_and_extras():
    result = run_cli("--version")
    assert result.exit_code == 0
    assert result.stdout.startswith(f"reparam {reparam_cli.__version__} (torch {torch.__version__.split('+')[0]}")
    assert "extras:" in result.stdout


def test_commands_start_without_torch():
    code = "import reparam_cli.commands.app, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.skipif(os.environ.get("REPARAM_SKIP_WHEEL") == "1", reason="REPARAM_SKIP_WHEEL=1")
def test_wheel_installs_and_runs_outside_the_clone(tmp_path):
    """Build the sdist and the wheel (from the sdist, as `python -m build` does), install the wheel
    into a fresh virtual environment whose other packages come from this one, and use the
    built-in specs from a folder far from the clone."""
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(ROOT)],
                   check=True, capture_output=True, cwd=tmp_path)
    wheels, sdists = list(dist.glob("*.whl")), list(dist.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1
    import zipfile

    names = zipfile.ZipFile(wheels[0]).namelist()
    assert sum(n.startswith("reparam_cli/model_specs/") and n.endswith(".yaml") for n in names) >= 30
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "REPARAM_SPECS_DIR")}
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # The wheel first (this environment's reparam_cli, seen through deps.pth, would count as installed).
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall", "-q",
                    str(wheels[0])], check=True, capture_output=True, env=env)
    deps = [p for p in sys.path if p.endswith("site-packages")]
    Path(site, "deps.pth").write_text("\n".join(deps) + "\n")  # torch & co. from this environment
    work = tmp_path / "elsewhere"
    work.mkdir()
    reparam = [str(env_dir / "bin" / "reparam")]

    def run(*args):
        return subprocess.run(reparam + list(args), cwd=work, env=env, capture_output=True, text=True)

    where = subprocess.run([str(py), "-c", "import reparam_cli; print(reparam_cli.__file__)"], cwd=work,
                           env=env, capture_output=True, text=True, check=True).stdout
    assert str(env_dir) in where and str(ROOT) not in where
    listed = run("specs", "--no-params")
    assert listed.returncode == 0 and "repvgg-a0" in listed.stdout, listed.stderr
    assert run("init", "repvgg-a0", "-o", "r.pth").returncode == 0
    converted = run("convert", "r.pth", "--spec", "repvgg-a0", "-o", "r.safetensors", "--input-shape", "1,3,32,32")
    assert converted.returncode == 0, converted.stderr
    assert (work / "r.safetensors").is_file()
