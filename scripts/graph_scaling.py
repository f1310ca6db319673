"""How conversion cost grows with the network: `reparam convert --no-verify` (recipes + graph pass)
against the floor of reading the same checkpoint and writing its tensors (with the model built from
the same spec, as any conversion must, and loaded), for torchvision
ResNet-18/50/101/152 and DenseNet-121 (random weights and BatchNorm statistics: no download).

    PYTHONPATH=. python scripts/graph_scaling.py [--models resnet18,resnet50,...] [--out DIR]

Each step runs in its own process (Python and torch imports included in both, as a user sees
them); wall time and that process's peak RSS (os.wait4). Prints one table; the issue's target is
convert <= 2x the floor in time and memory. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("resnet18", "resnet50", "resnet101", "resnet152", "densenet121")

SPEC = """
import torchvision


def build_model():
    return torchvision.models.{name}(weights=None)
"""

FLOOR = """
import importlib.util
import sys
import torch
from safetensors.torch import save_file
from reparam_cli.io.checkpoint import read_raw

spec = importlib.util.spec_from_file_location("spec", sys.argv[3])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
model = module.build_model()  # any conversion builds the model: its imports and construction count
state = read_raw(sys.argv[1], False)
model.load_state_dict(state)
save_file({{k: v.contiguous() for k, v in model.state_dict().items()}}, sys.argv[2])
"""


def run(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of one child process; raises if it fails."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    err = proc.stderr.read().decode() if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}): {err[-500:]}")
    return seconds, usage.ru_maxrss / 1024


def checkpoint(name: str, folder: Path) -> tuple[Path, Path]:
    import torchvision

    from reparam_cli.core.tensors import randomize_batchnorm

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    with torch.no_grad():
        randomize_batchnorm(model, torch.Generator().manual_seed(0))
    ckpt, spec = folder / f"{name}.pth", folder / f"{name}_spec.py"
    torch.save(model.state_dict(), ckpt)
    spec.write_text(SPEC.format(name=name))
    return ckpt, spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--out", default=None, help="folder for checkpoints and outputs (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.out or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        floor_py = folder / "floor.py"
        floor_py.write_text(FLOOR.format())
        print(f"{'model':12} {'MB':>6} {'floor s':>8} {'convert s':>10} {'x':>5} {'floor MiB':>10} "
              f"{'convert MiB':>12} {'x':>5}")
        for name in args.models.split(","):
            ckpt, spec = checkpoint(name, folder)
            size = ckpt.stat().st_size / 1e6
            floor_out = folder / f"{name}.floor.safetensors"
            floor_s, floor_mb = run([sys.executable, str(floor_py), str(ckpt), str(floor_out), str(spec)])
            conv_s, conv_mb = run([sys.executable, "-m", "reparam_cli", "convert", str(ckpt), "--spec", str(spec),
                                   "-o", str(folder / f"{name}.deploy.safetensors"), "--no-verify", "--overwrite"])
            print(f"{name:12} {size:6.0f} {floor_s:8.2f} {conv_s:10.2f} {conv_s / floor_s:5.2f} {floor_mb:10.0f} "
                  f"{conv_mb:12.0f} {conv_mb / floor_mb:5.2f}")


if __name__ == "__main__":
    main()
