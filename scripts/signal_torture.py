"""Kill `reparam convert` at random points and list what it leaves behind (it should leave nothing).

    python scripts/signal_torture.py --spec repvgg-b3 --runs 6            # SIGTERM and SIGKILL, alternating
    python scripts/signal_torture.py --spec repvgg-a0 --runs 4 --format pt2
    python scripts/signal_torture.py --spec repvgg-b3 --runs 6 --during-write       # while the file is written

Writes a random training checkpoint of the spec (or uses --checkpoint), times one whole conversion,
then runs the conversion again and again with its own output folder and $TMPDIR, sends the signal
after a random fraction of that time, and prints for each run: the signal, when it was sent, the exit
code, and every file left in the output folder or $TMPDIR (torch's own compiler cache
`torchinductor_USER` aside). A run that finished before the signal must have left exactly its
whole output. Exit status 1 if any run left something else.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def leftovers(*folders: Path) -> list[str]:
    return sorted(str(p.relative_to(f)) for f in folders for p in f.rglob("*") if "torchinductor_" not in str(p))


def writing(pid: int, folder: Path) -> bool:
    """Whether process `pid` holds an unnamed (O_TMPFILE) file in `folder`: it is writing the output."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(f"{folder}/#") or target.startswith(f"{folder}/.out.reparam-"):
            return True
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default="repvgg-a0")
    parser.add_argument("--checkpoint", type=Path, help="training checkpoint (default: a random one of --spec)")
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--format", default="safetensors")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no-verify", action="store_true", help="convert without verification (the write is "
                        "then a larger share of the run)")
    parser.add_argument("--during-write", action="store_true", help="signal while the output is being written: "
                        "as soon as the process holds an unnamed file in the output folder (plus 0-0.3s)")
    parser.add_argument("--window", default="0.05,1.0",
                        help="when to signal, as fractions of one conversion's time (e.g. 0.85,1.0: while writing)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    reparam = [sys.executable, "-m", "reparam_cli"]
    extra = ["--no-verify"] if args.no_verify else []
    with tempfile.TemporaryDirectory(prefix="torture-") as work:
        work = Path(work)
        ckpt = args.checkpoint
        if ckpt is None:
            ckpt = work / "train.pth"
            subprocess.run([*reparam, "init", args.spec, "-o", ckpt], env=env, check=True, capture_output=True)
        start = time.perf_counter()
        full = work / "full"
        full.mkdir()
        subprocess.run([*reparam, "convert", ckpt, "--spec", args.spec, "-f", args.format, "-o", full / "out", *extra],
                       env={**env, "TMPDIR": str(full)}, check=True, capture_output=True)
        duration = time.perf_counter() - start
        print(f"{args.spec}: one conversion ({args.format}) takes {duration:.1f}s here; "
              f"checkpoint {ckpt.stat().st_size / 1e6:.0f} MB")
        bad = 0
        for i in range(args.runs):
            sig = (signal.SIGTERM, signal.SIGKILL)[i % 2]
            out, tmp = work / f"out{i}", work / f"tmp{i}"
            out.mkdir(), tmp.mkdir()
            proc = subprocess.Popen([*reparam, "convert", ckpt, "--spec", args.spec, "-f", args.format,
                                     "-o", out / "out", *extra], env={**env, "TMPDIR": str(tmp)},
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if args.during_write:
                began = time.perf_counter()
                while proc.poll() is None and not writing(proc.pid, out):
                    time.sleep(0.005)
                time.sleep(rng.uniform(0.0, 0.3))
                at = time.perf_counter() - began
            else:
                at = rng.uniform(*map(float, args.window.split(","))) * duration
                time.sleep(at)
            proc.send_signal(sig)
            _, err = proc.communicate()
            left = leftovers(out, tmp)
            ok = left == [] or (proc.returncode == 0 and left == ["out"])
            bad += not ok
            last = err.decode().strip().splitlines()[-1:] if err and proc.returncode else []
            print(f"run {i}: {sig.name} at {at:5.1f}s -> exit {proc.returncode:4d}  left: {left or 'nothing'}"
                  f"  {'ok' if ok else 'LEFTOVER'}  {last[0][:80] if last else ''}")
        return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
