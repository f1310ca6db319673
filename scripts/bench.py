#!/usr/bin/env python
"""Benchmark reparam: conversion cost against the read+write floor, deploy speed, batch scaling.

    python scripts/bench.py [--specs repvgg-a0,repvgg-b3,mobileone-s4] [--runs 3] [--update-readme]

Every figure is measured in this run, on this machine, as whole processes (wall seconds and peak
RSS from the kernel's rusage of each child), so ratios compare like with like:

  (a) floor    a Python process that imports torch, loads the safetensors checkpoint and saves
               the same tensors: the cost of reading and writing the bytes
  (b) reparam  `reparam convert --no-verify`
  (c) reparam  `reparam convert` (verified on the spec's input shape)
  (d) timm     timm's own path for the same architecture: create the model, load, reparameterize,
               save (only where timm is installed and has the architecture)

Library routes (`--routes`): for timm RepVGG-B3, torchvision ResNet-50 and ultralytics YOLOv8-L,
the library's own fuse-and-save path (timm `reparameterize_model`, `torch.fx`'s fuser,
ultralytics `model.fuse()`: create, load, fuse, save) beside `reparam convert --spec <route>`
with and without verification, all against the floor on the same checkpoint. Figures are wall
time, CPU time (user + system) and peak RSS of each whole process; the machine's load average is
printed at the start and the end of the run (figures from a busy machine are not comparable).

Then the CPU time of a B3 conversion beside a busy torch process (`busy`), CPU latency of training form vs deploy form (batch 1 and 16, 224x224, 2 threads), parameter
and FLOP counts, and `reparam batch --jobs 2` vs `--jobs 1` on 16 small checkpoints. The tables
are printed and written to docs/benchmark.md (and into the README with --update-readme).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FLOOR = """import sys, torch
from safetensors.torch import load_file, save_file
save_file(load_file(sys.argv[1]), sys.argv[2])
"""
TIMM_PATH = """import sys, torch, timm
from safetensors.torch import load_file, save_file
from timm.utils.model import reparameterize_model
model = timm.create_model(sys.argv[3], pretrained=False)
model.load_state_dict(load_file(sys.argv[1]))
model = reparameterize_model(model.eval())
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sys.argv[2])
"""
TIMM_INIT = """import sys, timm
from safetensors.torch import save_file
model = timm.create_model(sys.argv[2], pretrained=False)
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sys.argv[1])
"""
TORCHVISION_INIT = """import sys, torch, torchvision
from safetensors.torch import save_file
torch.manual_seed(0)
model = getattr(torchvision.models, sys.argv[2])(weights=None).eval()
with torch.no_grad():
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1); m.running_var.uniform_(0.5, 1.5)
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sys.argv[1])
"""
TORCHVISION_PATH = """import sys, torch, torchvision
from safetensors.torch import load_file, save_file
from torch.fx.experimental.optimization import fuse
model = getattr(torchvision.models, sys.argv[3])(weights=None)
model.load_state_dict(load_file(sys.argv[1]))
model = fuse(model.eval())
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sys.argv[2])
"""
ULTRALYTICS_INIT = """import sys
from safetensors.torch import save_file
from ultralytics import YOLO
model = YOLO(sys.argv[2]).model
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sys.argv[1])
"""
ULTRALYTICS_PATH = """import sys
from safetensors.torch import load_file, save_file
from ultralytics import YOLO
model = YOLO(sys.argv[3]).model
model.load_state_dict(load_file(sys.argv[1]))
model = model.eval().fuse(verbose=False)
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sys.argv[2])
"""
# route -> (library module, init script, library path script, the library's own name, its label)
ROUTES = {
    "timm:repvgg_b3": ("timm", TIMM_INIT, TIMM_PATH, "repvgg_b3", "timm: create, load, reparameterize_model, save"),
    "torchvision:resnet50": ("torchvision", TORCHVISION_INIT, TORCHVISION_PATH, "resnet50",
                             "torchvision: create, load, torch.fx fuse, save"),
    "ultralytics:yolov8l.yaml": ("ultralytics", ULTRALYTICS_INIT, ULTRALYTICS_PATH, "yolov8l.yaml",
                                 "ultralytics: create, load, model.fuse(), save"),
}
TIMM_NAMES = {f"repvgg-{v}": f"repvgg_{v}" for v in ("a0", "a1", "a2", "b0", "b1", "b1g4", "b2", "b2g4", "b3", "b3g4")}
TIMM_NAMES.update({f"mobileone-s{i}": f"mobileone_s{i}" for i in range(5)})
README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"


def forward_ms(model, x, runs: int, warmup: int = 3) -> float:
    """Median wall time of `model(x)` in milliseconds, over `runs` passes after `warmup` passes."""
    import torch

    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure_cpu(cmd: list[str], env: dict | None = None) -> tuple[float, float, int]:
    """Run `cmd` to completion: (wall seconds, CPU seconds (user + system), peak RSS bytes)."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            tail = err.read().decode(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"{' '.join(cmd[:4])}... exited {proc.returncode}: {' | '.join(tail)}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, int]:
    """Run `cmd` to completion: (wall seconds, peak RSS bytes of that process)."""
    wall, _, rss = measure_cpu(cmd, env)
    return wall, rss


def routes(names: list[str], runs: int, work: Path) -> list[dict]:
    """Library routes against the library's own fuse-and-save path and the floor (see the module doc),
    interleaved run by run."""
    rows = []
    for route in names:
        library, init, own, name, label = ROUTES[route]
        if not have(library):
            print(f"  {route}: {library} is not installed, skipped", file=sys.stderr)
            continue
        ckpt = work / f"{route.replace(':', '_')}.safetensors"
        if not ckpt.exists():
            subprocess.run([sys.executable, "-c", init, str(ckpt), name], check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        paths = {
            "(a) floor: load + save": [sys.executable, "-c", FLOOR, str(ckpt), str(work / "floor.safetensors")],
            f"(l) {label}": [sys.executable, "-c", own, str(ckpt), str(work / "l.safetensors"), name],
            "(b) reparam convert --no-verify": reparam("convert", str(ckpt), "--spec", route, "-o",
                                                       str(work / "b.safetensors"), "--no-verify", "--overwrite"),
            "(c) reparam convert (verified)": reparam("convert", str(ckpt), "--spec", route, "-o",
                                                      str(work / "c.safetensors"), "--overwrite"),
        }
        samples: dict[str, list[tuple[float, float, int]]] = {p: [] for p in paths}
        for run in range(runs):
            for p, cmd in paths.items():
                samples[p].append(measure_cpu(cmd))
            print(f"  {route}: run {run + 1}/{runs} done", file=sys.stderr)
        med = {p: tuple(statistics.median(v[i] for v in values) for i in range(3)) for p, values in samples.items()}
        floor = med["(a) floor: load + save"]
        lib = med[f"(l) {label}"]
        for p, (wall, cpu, rss) in med.items():
            rows.append({"route": route, "path": p, "wall": wall, "cpu": cpu, "rss": rss, "x_floor": wall / floor[0],
                         "x_library": wall / lib[0], "cpu_x_library": cpu / lib[1], "size": ckpt.stat().st_size})
    return rows


def have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def reparam(*args: str) -> list[str]:
    return [sys.executable, "-m", "reparam_cli", *args]


def conversion(specs: list[str], runs: int, work: Path) -> list[dict]:
    """Rows of (path, median wall, median RSS) per spec, measured interleaved to spread noise."""
    from reparam_cli.pipeline.specs import builtin_names

    rows = []
    for spec in specs:
        if spec not in builtin_names():
            print(f"  {spec}: not a built-in spec here, skipped", file=sys.stderr)
            continue
        ckpt = work / f"{spec}.safetensors"
        if not ckpt.exists():
            subprocess.run(reparam("init", spec, "-o", str(ckpt)), check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        paths = {
            "(a) floor: load + save": [sys.executable, "-c", FLOOR, str(ckpt), str(work / "floor.safetensors")],
            "(b) reparam convert --no-verify": reparam("convert", str(ckpt), "--spec", spec, "-o",
                                                       str(work / "b.safetensors"), "--no-verify", "--overwrite"),
            "(c) reparam convert (verified)": reparam("convert", str(ckpt), "--spec", spec, "-o",
                                                      str(work / "c.safetensors"), "--overwrite"),
        }
        timm_name = TIMM_NAMES.get(spec)
        if timm_name and have("timm"):
            timm_ckpt = work / f"{spec}.timm.safetensors"
            if not timm_ckpt.exists():
                subprocess.run([sys.executable, "-c", TIMM_INIT, str(timm_ckpt), timm_name], check=True,
                               stderr=subprocess.DEVNULL)
            paths["(d) timm: create, load, reparameterize, save"] = [
                sys.executable, "-c", TIMM_PATH, str(timm_ckpt), str(work / "d.safetensors"), timm_name]
        samples: dict[str, list[tuple[float, int]]] = {name: [] for name in paths}
        for run in range(runs):
            for name, cmd in paths.items():
                samples[name].append(measure(cmd))
            print(f"  {spec}: run {run + 1}/{runs} done", file=sys.stderr)
        floor_wall = statistics.median(w for w, _ in samples["(a) floor: load + save"])
        floor_rss = statistics.median(r for _, r in samples["(a) floor: load + save"])
        for name, values in samples.items():
            wall = statistics.median(w for w, _ in values)
            rss = statistics.median(r for _, r in values)
            rows.append({"spec": spec, "path": name, "wall": wall, "rss": rss, "wall_ratio": wall / floor_wall,
                         "rss_delta": rss - floor_rss, "size": ckpt.stat().st_size})
    return rows


def latency(specs: list[str], runs: int) -> list[dict]:
    """Median forward time of training vs deploy form, 224x224, 2 threads, batch 1 and 16."""
    import torch

    from reparam_cli.convert.engine import reparameterize
    from reparam_cli.core.tensors import randomize_batchnorm
    from reparam_cli.pipeline.specs import builtin_names, load_spec

    torch.set_num_threads(2)
    rows = []
    for spec in specs:
        if spec not in builtin_names():
            continue
        torch.manual_seed(0)
        train = load_spec(spec).build().eval()
        with torch.no_grad():
            randomize_batchnorm(train, torch.Generator().manual_seed(0))
        deploy, _ = reparameterize(train)
        deploy.eval()
        for batch, reps in ((1, max(10, 10 * runs)), (16, max(3, runs))):
            x = torch.randn(batch, 3, 224, 224)
            train_ms, deploy_ms = forward_ms(train, x, reps), forward_ms(deploy, x, reps)
            rows.append({"spec": spec, "batch": batch, "train_ms": train_ms, "deploy_ms": deploy_ms,
                         "speedup": train_ms / deploy_ms})
    return rows


def sizes(specs: list[str]) -> list[dict]:
    """Parameters and FLOPs before/after, counted on meta-device models at the spec's input shape."""
    from reparam_cli.core.tensors import count_parameters
    from reparam_cli.convert.engine import reparameterize
    from reparam_cli.pipeline.specs import builtin_names, load_spec
    from reparam_cli.core.stats import count_flops

    rows = []
    for spec in specs:
        if spec not in builtin_names():
            continue
        s = load_spec(spec)
        train = s.build(device="meta").eval()
        deploy, _ = reparameterize(train)
        rows.append({"spec": spec, "params_before": count_parameters(train), "params_after": count_parameters(deploy),
                     "flops_before": count_flops(train, s.input_shape), "flops_after": count_flops(deploy, s.input_shape)})
    return rows


def batch_scaling(work: Path, runs: int, spec: str = "repvgg-a0", files: int = 16) -> dict | None:
    """`reparam batch --jobs 2` vs `--jobs 1` on `files` checkpoints of `spec` (verified, default shape)."""
    help_text = subprocess.run(reparam("--help"), capture_output=True, text=True).stdout
    if " batch " not in help_text:
        print("  reparam batch is not available here, skipped", file=sys.stderr)
        return None
    folder = work / "batch-in"
    if not folder.exists():
        folder.mkdir()
        first = folder / "ckpt-00.safetensors"
        subprocess.run(reparam("init", spec, "-o", str(first)), check=True, stdout=subprocess.DEVNULL)
        for i in range(1, files):
            shutil.copy(first, folder / f"ckpt-{i:02d}.safetensors")
    walls: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(runs):
        for jobs in (1, 2):
            out = work / f"batch-out-{jobs}"
            shutil.rmtree(out, ignore_errors=True)
            walls[jobs].append(measure(reparam("batch", str(folder), "--spec", spec, "--output-dir", str(out),
                                                "--jobs", str(jobs)))[0])
    one, two = statistics.median(walls[1]), statistics.median(walls[2])
    return {"spec": spec, "files": files, "jobs1": one, "jobs2": two, "speedup": one / two}


BUSY = """import time, torch
torch.set_num_threads(2)
a = torch.randn(1500, 1500)
end = time.monotonic() + float(__import__("sys").argv[1])
while time.monotonic() < end:
    a @ a
"""


def busy_neighbour(work: Path, runs: int, spec: str = "repvgg-b3") -> dict | None:
    """CPU time of `reparam convert --no-verify` alone and beside a busy torch process (2 threads of
    matrix products on the same cores), interleaved: what sharing the machine costs a conversion."""
    ckpt = work / f"{spec}.safetensors"
    if not ckpt.exists():
        return None
    cmd = reparam("convert", str(ckpt), "--spec", spec, "-o", str(work / "busy.safetensors"), "--no-verify",
                  "--overwrite")
    quiet, busy = [], []
    for run in range(runs):
        quiet.append(measure_cpu(cmd)[1])
        neighbour = subprocess.Popen([sys.executable, "-c", BUSY, "600"], stdout=subprocess.DEVNULL)
        try:
            time.sleep(3)  # the neighbour is computing before the conversion starts
            busy.append(measure_cpu(cmd)[1])
        finally:
            neighbour.kill()
            neighbour.wait()
        print(f"  busy neighbour: run {run + 1}/{runs} done", file=sys.stderr)
    q, b = statistics.median(quiet), statistics.median(busy)
    return {"spec": spec, "quiet": q, "busy": b, "ratio": b / q}


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = ""
    try:
        kb = int(next(l.split()[1] for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")))
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores{mem}; Python {platform.python_version()}, torch {torch.__version__}; "
            f"{datetime.date.today().isoformat()}")


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def render(conv, lat, size, scale, runs: int, lib_routes=(), load: str = "", busy=None) -> str:
    lines = [f"Machine: {machine()}. Medians of {runs} runs. {load}".rstrip(), ""]
    if conv:
        lines += ["Conversion (whole processes; ratios against (a), measured in the same run):", "",
                  "| spec | path | wall | x floor | peak RSS | RSS - floor |", "|---|---|---|---|---|---|"]
        for r in conv:
            lines.append(f"| {r['spec']} ({r['size'] / 1e6:.0f} MB) | {r['path']} | {r['wall']:.2f} s | "
                         f"{r['wall_ratio']:.2f} | {gb(r['rss'])} | {r['rss_delta'] / 1e9:+.2f} GB |")
        lines.append("")
    if lib_routes:
        lines += ["Library routes (whole processes, the same checkpoint; ratios measured in the same run):", "",
                  "| route | path | wall | CPU | peak RSS | x floor | x library (wall / CPU) |",
                  "|---|---|---|---|---|---|---|"]
        for r in lib_routes:
            lines.append(f"| {r['route']} ({r['size'] / 1e6:.0f} MB) | {r['path']} | {r['wall']:.2f} s | {r['cpu']:.2f} s | "
                         f"{gb(r['rss'])} | {r['x_floor']:.2f} | {r['x_library']:.2f} / {r['cpu_x_library']:.2f} |")
        lines.append("")
    if lat:
        lines += ["Deploy speed (CPU, 2 threads, 224x224, median forward time):", "",
                  "| spec | batch | training form | deploy form | speed-up |", "|---|---|---|---|---|"]
        for r in lat:
            lines.append(f"| {r['spec']} | {r['batch']} | {r['train_ms']:.1f} ms | {r['deploy_ms']:.1f} ms | "
                         f"{r['speedup']:.2f}x |")
        lines.append("")
    if size:
        lines += ["Size (FLOPs of convs and matmuls at the spec's input shape; a multiply-add counts 2):", "",
                  "| spec | params before | params after | GFLOPs before | GFLOPs after |", "|---|---|---|---|---|"]
        for r in size:
            fb = "-" if r["flops_before"] is None else f"{r['flops_before'] / 1e9:.2f}"
            fa = "-" if r["flops_after"] is None else f"{r['flops_after'] / 1e9:.2f}"
            lines.append(f"| {r['spec']} | {r['params_before'] / 1e6:.2f} M | {r['params_after'] / 1e6:.2f} M | "
                         f"{fb} | {fa} |")
        lines.append("")
    if busy:
        lines += [f"Sharing the machine: `reparam convert --no-verify` of {busy['spec']}, CPU time (user + system) "
                  f"{busy['quiet']:.2f} s alone, {busy['busy']:.2f} s beside a busy 2-thread torch process: "
                  f"{busy['ratio']:.2f}x.", ""]
    if scale:
        lines += [f"Batch: {scale['files']} {scale['spec']} checkpoints, verified: `--jobs 1` {scale['jobs1']:.1f} s, "
                  f"`--jobs 2` {scale['jobs2']:.1f} s: {scale['speedup']:.2f}x.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--specs", default="repvgg-a0,repvgg-b3,mobileone-s4", help="specs for the conversion table")
    parser.add_argument("--latency-specs", default="repvgg-a0,mobileone-s0", help="specs for the latency table")
    parser.add_argument("--runs", type=int, default=3, help="runs per measurement (medians are reported)")
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "bench", help="folder for checkpoints and outputs")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmark.md", help="markdown report to write")
    parser.add_argument("--update-readme", action="store_true", help="also replace the README's benchmark section")
    parser.add_argument("--routes", default=",".join(ROUTES), help="library routes to compare with the library's own path")
    parser.add_argument("--skip", default="", help="comma list of sections to skip: conversion,routes,latency,size,busy,batch")
    args = parser.parse_args()
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # as users run it: with .pyc files, not recompiling each run
    skip = set(filter(None, args.skip.split(",")))
    args.work.mkdir(parents=True, exist_ok=True)
    specs = [s for s in args.specs.split(",") if s]
    lat_specs = [s for s in args.latency_specs.split(",") if s]

    os.environ.setdefault("YOLO_CONFIG_DIR", str(args.work / "yolo-config"))  # ultralytics writes its settings there
    load_start = os.getloadavg()[0]
    print("conversion ...", file=sys.stderr)
    conv = [] if "conversion" in skip else conversion(specs, args.runs, args.work)
    print("library routes ...", file=sys.stderr)
    lib_routes = [] if "routes" in skip else routes([r for r in args.routes.split(",") if r], args.runs, args.work)
    print("latency ...", file=sys.stderr)
    lat = [] if "latency" in skip else latency(lat_specs, args.runs)
    size = [] if "size" in skip else sizes(list(dict.fromkeys(specs + lat_specs)))
    print("busy neighbour ...", file=sys.stderr)
    busy = None if "busy" in skip else busy_neighbour(args.work, args.runs)
    print("batch ...", file=sys.stderr)
    scale = None if "batch" in skip else batch_scaling(args.work, args.runs)

    load = f"Load average (1 min) at the start of the timed sections {load_start:.2f}, at the end {os.getloadavg()[0]:.2f}."
    report = render(conv, lat, size, scale, args.runs, lib_routes, load, busy)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("# Benchmark\n\nWritten by `scripts/bench.py` (`make bench`).\n\n" + report + "\n")
    if args.update_readme:
        readme = ROOT / "README.md"
        text = readme.read_text()
        if README_START in text and README_END in text:
            head, rest = text.split(README_START, 1)
            _, tail = rest.split(README_END, 1)
            readme.write_text(f"{head}{README_START}\n{report}\n{README_END}{tail}")
        else:
            print("README has no benchmark markers; not updated", file=sys.stderr)


if __name__ == "__main__":
    main()
