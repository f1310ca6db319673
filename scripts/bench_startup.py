"""How fast reparam answers at the shell: bad input, help, and `inspect --spec` on RepVGG-B3.

Every figure is the median wall time of several runs of a whole process, measured in this one run
next to `python -c "import torch"` (the floor any command that touches a model pays), in an
interleaved order so that a busy machine slows all of them alike. Targets (issue 12): usage errors,
unknown specs, missing files and missing extras under 0.5 s; `inspect --spec` on RepVGG-B3 no more
than importing torch + 0.3 s.

    python scripts/bench_startup.py [--runs 7] [--keep DIR] [--typer-path DIR]

The B3 checkpoints (a 493 MB .pth and its .safetensors twin) are written by `reparam init` into a
temporary folder (or DIR, reused when it holds them already).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Hides the onnx modules from importlib.util.find_spec, to time the "missing extra" answer on a
# machine that has them installed.
HIDE_ONNX = (
    "import importlib.util as u\n"
    "_find = u.find_spec\n"
    "u.find_spec = lambda name, *a, **k: None if name.split('.')[0] in ('onnx', 'onnxscript') else _find(name, *a, **k)\n"
)


def _reparam(*args: str) -> list[str]:
    return [sys.executable, "-m", "reparam_cli", *args]


def _time(cmd: list[str], env: dict[str, str], expect: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system of the process) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != expect:
        raise SystemExit(f"{' '.join(cmd)}: exit {result.returncode}, expected {expect}: {result.stderr.strip()}")
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="runs per command (median reported)")
    parser.add_argument("--keep", type=Path, help="folder for the B3 checkpoints (kept, reused)")
    parser.add_argument("--typer-path", type=Path, help="also time inspect with the typer installed in this folder "
                        "(pip install --target DIR --no-deps typer==0.28.0): typer 0.29 parses arguments with "
                        "pydantic, which every command then imports")
    args = parser.parse_args()

    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    # As users run it: with .pyc files (the warm-up run writes them), not recompiling every module.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    folder = args.keep or Path(tempfile.mkdtemp(prefix="reparam-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    b3_pth, b3_st = folder / "b3.pth", folder / "b3.safetensors"
    for path in (b3_pth, b3_st):
        if not path.exists():
            print(f"writing {path} (reparam init repvgg-b3) ...", file=sys.stderr)
            subprocess.run(_reparam("init", "repvgg-b3", "-o", str(path)), env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    hidden = folder / "hide_onnx"
    hidden.mkdir(exist_ok=True)
    (hidden / "sitecustomize.py").write_text(HIDE_ONNX)
    env_hidden = {**env, "PYTHONPATH": f"{hidden}{os.pathsep}{env['PYTHONPATH']}"}

    cases = [  # (label, command, env, expected exit code, target)
        ('python -c "import torch" (floor)', [sys.executable, "-c", "import torch"], env, 0, None),
        ("reparam --help", _reparam("--help"), env, 0, "< 0.5 s"),
        ("usage error (convert, no arguments)", _reparam("convert"), env, 2, "< 0.5 s"),
        ("unknown spec (--spec repvgg_a0)", _reparam("convert", str(b3_pth), "--spec", "repvgg_a0"), env, 2, "< 0.5 s"),
        ("missing file", _reparam("convert", "missing.pth", "--spec", "repvgg-a0"), env, 2, "< 0.5 s"),
        ("missing extra (-f onnx, onnx hidden)", _reparam("convert", str(b3_pth), "--spec", "repvgg-b3", "-f", "onnx"),
         env_hidden, 2, "< 0.5 s"),
        ("inspect --spec repvgg-b3, .pth (493 MB)", _reparam("inspect", str(b3_pth), "--spec", "repvgg-b3", "--json"),
         env, 0, "torch + 0.3 s"),
        ("inspect --spec repvgg-b3, .safetensors",
         _reparam("inspect", str(b3_st), "--spec", "repvgg-b3", "--json"), env, 0, "torch + 0.3 s"),
    ]
    if args.typer_path:
        from importlib.metadata import PathDistribution

        other = next(PathDistribution(p).version for p in args.typer_path.glob("typer-*.dist-info"))
        env_typer = {**env, "PYTHONPATH": f"{args.typer_path}{os.pathsep}{env['PYTHONPATH']}"}
        cases.append((f"inspect --spec repvgg-b3, .safetensors, typer {other}",
                      _reparam("inspect", str(b3_st), "--spec", "repvgg-b3", "--json"), env_typer, 0, "torch + 0.3 s"))
    times: dict[str, list[tuple[float, float]]] = {label: [] for label, *_ in cases}
    for label, cmd, run_env, expect, _ in cases:  # warm-up: file cache, .pyc files
        _time(cmd, run_env, expect)
    for _ in range(args.runs):
        for label, cmd, run_env, expect, _ in cases:
            times[label].append(_time(cmd, run_env, expect))

    def medians(label: str) -> tuple[float, float]:
        return (statistics.median(t[0] for t in times[label]), statistics.median(t[1] for t in times[label]))

    floor_wall, floor_cpu = medians(cases[0][0])
    from importlib.metadata import version

    print(f"Python {sys.version.split()[0]}, torch {version('torch')}, typer {version('typer')}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; medians of {args.runs} runs, interleaved. CPU: user + system "
          "time of the process, which a busy machine inflates less than wall time (targets are judged on it).\n")
    print("| command | wall | - import torch | CPU | - import torch | target | met (CPU) |")
    print("|---|---|---|---|---|---|---|")
    for label, _, _, _, target in cases:
        wall, cpu = medians(label)
        met = "-" if target is None else (
            ("yes" if cpu < 0.5 else "no") if target == "< 0.5 s" else ("yes" if cpu - floor_cpu <= 0.3 else "no"))
        print(f"| {label} | {wall:.2f} s | {wall - floor_wall:+.2f} s | {cpu:.2f} s | {cpu - floor_cpu:+.2f} s "
              f"| {target or '-'} | {met} |")

if __name__ == "__main__":
    main()
