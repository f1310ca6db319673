"""Files: nothing half-written (signals, SIGKILL, full disk), race-free publishing, special files as
inputs and outputs, batch workers that die with their parent, manifests that survive junk and failed
runs, and trainer checkpoints with foreign classes read without running code."""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from reparam_cli.pipeline.batch import discover
from reparam_cli.io.checkpoint import read_checkpoint, read_raw
from reparam_cli.errors import CheckpointError, OutputError
from reparam_cli.pipeline.conversion import init_checkpoint
from reparam_cli.io.safeio import atomic_output, clean_stale_temps

from .helpers import run_cli, spec_and_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = """\
name: tiny-repvgg
builder: reparam_cli.blocks.repvgg:RepVGG
args: {num_blocks: [1, 1, 1, 1], width_multiplier: [0.25, 0.25, 0.25, 0.25], num_classes: 10}
input_shape: [1, 3, 32, 32]
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(spec, training checkpoint) of a small RepVGG."""
    return spec_and_checkpoint(tmp_path_factory.mktemp("tiny"), TINY)


@pytest.fixture(scope="module")
def a0(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("a0") / "a0.pth"
    init_checkpoint("repvgg-a0", path, seed=0)
    return path


def reparam(*args, tmpdir: Path, prelude: str = "", wait: bool = True, **kwargs):
    """Run the CLI in a fresh interpreter with its own $TMPDIR; `prelude` runs first (test hooks)."""
    code = prelude + "\nimport sys\nfrom reparam_cli.commands.app import main\nsys.argv = ['reparam', *sys.argv[1:]]\nmain()\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmpdir), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", code, *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)
    return subprocess.run(cmd, env=env, capture_output=True, timeout=300, **kwargs)


def one_line(stderr: bytes) -> str:
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr.decode(), stderr.decode()
    return lines[0]


def listing(*folders: Path) -> list[str]:
    """Every entry (hidden ones included) in the folders."""
    return sorted(str(p) for f in folders for p in f.rglob("*"))


# --- nothing half-written ---------------------------------------------------------------------------

# Hooks that stop a conversion at a precise point of writing its output.
MID_WRITE = """
import os, signal
import reparam_cli.io.safetensors as export
def _serialize(f, state, meta):
    f.write(b"x" * 100000)
    f.flush()
    os.kill(os.getpid(), signal.{sig})
    f.write(b"y" * 100000)
export._serialize_safetensors = _serialize
"""
BEFORE_PUBLISH = """
import os, signal
import reparam_cli.io.safeio as safeio
def _publish(*args):
    os.kill(os.getpid(), signal.{sig})
safeio._publish = _publish
"""


@pytest.mark.parametrize("sig, hook, fmt", [("SIGKILL", MID_WRITE, "safetensors"),
                                            ("SIGKILL", BEFORE_PUBLISH, "torchscript"),
                                            ("SIGTERM", MID_WRITE, "safetensors"),
                                            ("SIGHUP", BEFORE_PUBLISH, "safetensors"),
                                            ("SIGINT", BEFORE_PUBLISH, "safetensors")])
def test_a_signal_while_writing_leaves_nothing(tiny, tmp_path, sig, hook, fmt):
    spec, ckpt = tiny
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    out.mkdir(), tmp.mkdir()
    result = reparam("convert", ckpt, "--spec", spec, "-o", out / f"m.{fmt}", "-f", fmt, "--no-verify",
                     tmpdir=tmp, prelude=hook.replace("{sig}", sig))
    signum = getattr(signal, sig)
    if sig == "SIGKILL":
        assert result.returncode == -signum
    else:  # handled like Ctrl-C: cleanup, one line, 128 + signal
        assert result.returncode == 128 + signum and f"interrupted by {sig}" in one_line(result.stderr)
    assert listing(out, tmp) == []


def test_pipes_leave_nothing_in_tmpdir_even_when_killed(tiny, tmp_path):
    """`- -o -`: the stdin spool and the output before it is streamed have no name in $TMPDIR."""
    spec, ckpt = tiny
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with open(ckpt, "rb") as stdin:
        result = reparam("convert", "-", "--spec", spec, "-o", "-", "--no-verify", tmpdir=tmp, stdin=stdin,
                         prelude=BEFORE_PUBLISH.replace("{sig}", "SIGKILL"))
    assert result.returncode == -signal.SIGKILL and result.stdout == b"" and listing(tmp) == []
    with open(ckpt, "rb") as stdin:
        result = reparam("convert", "-", "--spec", spec, "-o", "-", "--no-verify", tmpdir=tmp, stdin=stdin)
    assert result.returncode == 0 and result.stdout[8:9] == b"{" and listing(tmp) == []


def test_sigkill_with_named_temporaries_is_cleaned_by_the_next_run(tiny, tmp_path):
    """Where O_TMPFILE is missing, a SIGKILLed write leaves a hidden temporary named after its owner
    process; the next run writing to that folder (which uses the same fallback there) removes it with
    `clean_stale_temps`, since its owner is gone."""
    spec, ckpt = tiny
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    out.mkdir(), tmp.mkdir()
    no_tmpfile = "import reparam_cli.io.safeio as safeio\nsafeio._open_unnamed = lambda folder: None\n"
    result = reparam("convert", ckpt, "--spec", spec, "-o", out / "m.safetensors", "--no-verify", tmpdir=tmp,
                     prelude=no_tmpfile + MID_WRITE.replace("{sig}", "SIGKILL"))
    assert result.returncode == -signal.SIGKILL
    left = [p.name for p in out.iterdir()]
    assert len(left) == 1 and left[0].startswith(".m.safetensors.reparam-") and ".tmp" in left[0]
    assert clean_stale_temps(out) == left and list(out.iterdir()) == []
    # A live owner's temporary is left alone.
    mine = out / f".x.reparam-h-{os.getpid()}-0123abcd.tmp"
    mine.write_bytes(b"")
    assert clean_stale_temps(out) == [] and mine.exists()


def test_signals_at_random_points_of_a_repvgg_a0_convert(a0, tmp_path):
    """SIGTERM and SIGKILL at random times: nothing in the output folder or $TMPDIR unless the run
    finished (then the output is whole)."""
    rng = random.Random(int(time.time()))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        out, tmp = tmp_path / f"out{sig}", tmp_path / f"tmp{sig}"
        out.mkdir(), tmp.mkdir()
        proc = reparam("convert", a0, "--spec", "repvgg-a0", "-o", out / "a0.safetensors", "--no-verify",
                       tmpdir=tmp, wait=False)
        time.sleep(rng.uniform(0.5, 6.0))
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode in (0, -sig, 128 + sig), err.decode()
        assert listing(tmp) == []
        if (out / "a0.safetensors").exists():  # published before the signal: a whole, loadable output
            from safetensors.torch import load_file

            assert len(load_file(out / "a0.safetensors")) > 0 and listing(out) == [str(out / "a0.safetensors")]
            continue
        assert proc.returncode != 0 and listing(out) == []


def test_full_disk_while_writing_torchscript_or_pt2_is_one_line(tiny, tmp_path):
    """A write that fails under torch's C++ writer (here: RLIMIT_FSIZE, which fails writes with EFBIG
    like a full disk fails them with ENOSPC) is exit 2 and one line, not an abort."""
    spec, ckpt = tiny
    tmp = tmp_path / "tmp"
    tmp.mkdir()

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    for fmt in ("torchscript", "pt2"):
        result = reparam("convert", ckpt, "--spec", spec, "-o", tmp_path / f"m.{fmt}", "-f", fmt, "--no-verify",
                         tmpdir=tmp, preexec_fn=limit)
        assert result.returncode == 2, result.stderr.decode()[-2000:]
        assert "file too large" in one_line(result.stderr) and f"m.{fmt}" in one_line(result.stderr)
        # (torch.export keeps its compiler cache in $TMPDIR/torchinductor_USER: torch's, not an output)
        assert [p for p in listing(tmp_path) if "torchinductor_" not in p] == [str(tmp)]


# --- publishing ---------------------------------------------------------------------------------------

def test_publishing_never_replaces_a_file_that_appears_meanwhile(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(OutputError, match="appeared while this run was writing"):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"mine")
            target.write_bytes(b"theirs")  # a concurrent run published first
    assert target.read_bytes() == b"theirs" and listing(tmp_path) == [str(target)]
    with atomic_output(target, overwrite=True) as tmp:
        tmp.write_bytes(b"mine")
    assert target.read_bytes() == b"mine" and listing(tmp_path) == [str(target)]
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_two_concurrent_converts_to_one_output(tiny, tmp_path):
    spec, ckpt = tiny
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    target = tmp_path / "same.safetensors"
    procs = [reparam("convert", ckpt, "--spec", spec, "-o", target, "--no-verify", tmpdir=tmp, wait=False)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close(), p.stderr.close()
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "already exists" in one_line(loser)
    assert listing(tmp_path) == sorted([str(tmp), str(target)])


def test_special_outputs_are_refused_never_replaced(tiny, tmp_path):
    spec, ckpt = tiny
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    folder = tmp_path / "dir"
    folder.mkdir()
    for target, fragment in ((fifo, "named pipe"), (folder, "is a directory"), (Path("/dev/null"), "character device")):
        for extra in ((), ("--overwrite",)):
            result = run_cli("convert", ckpt, "--spec", spec, "-o", target, "--no-verify", *extra)
            assert result.exit_code == 2 and fragment in result.stderr, result.stderr
    assert fifo.is_fifo() and folder.is_dir() and Path("/dev/null").is_char_device()
    result = run_cli("init", spec, "-o", fifo)
    assert result.exit_code == 2 and "named pipe" in result.stderr and fifo.is_fifo()


# --- inputs that never end or are not files ------------------------------------------------------------

def test_endless_and_special_inputs_are_refused_quickly(tmp_path):
    fifo = tmp_path / "ckpt.pth"
    os.mkfifo(fifo)  # nobody writes to it: opening it would block forever
    sparse = tmp_path / "sparse.pth"
    with open(sparse, "wb") as f:  # 1 TiB of holes behind a zip header: hashing it would take hours
        f.write(b"PK\x03\x04" + b"\0" * 60)
        f.truncate(1 << 40)
    zeros = tmp_path / "zeros.pth"
    with open(zeros, "wb") as f:
        f.truncate(1 << 40)
    for path, fragment in (("/dev/zero", "character device"), (fifo, "named pipe"), (sparse, "sparse file"),
                           (zeros, "neither a safetensors file nor a torch checkpoint")):
        for command in (("convert", path, "--spec", "repvgg-a0"), ("inspect", path)):
            result = run_cli(*command)
            assert result.exit_code == 2, (command, result.stderr)
            assert fragment in result.stderr or (command[0] == "inspect" and "not a file" in result.stderr), \
                (command, result.stderr)
    with pytest.raises(CheckpointError, match="named pipe"):
        read_raw(fifo)


def test_dev_zero_and_a_pipe_from_the_command_line(tmp_path):
    result = run_cli("convert", "-", "--spec", "repvgg-a0", "-o", "-", stdin=bytes(1 << 20))  # `- < /dev/zero`
    assert result.exit_code == 2 and "neither a safetensors" in result.stderr and result.stdout == ""
    read, write = os.pipe()  # a process substitution `<(...)` is a pipe at /dev/fd/N
    try:
        os.write(write, b"PK\x03\x04" + bytes(1000))
        result = run_cli("convert", f"/dev/fd/{read}", "--spec", "repvgg-a0")
    finally:
        os.close(read), os.close(write)
    assert result.exit_code == 2 and "named pipe" in result.stderr and "- < FILE" in result.stderr


# --- batch -----------------------------------------------------------------------------------------

def _children(pid: int) -> set[int]:
    """Every descendant of `pid` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_kill_9_of_a_batch_stops_its_workers(tiny, tmp_path):
    spec, ckpt = tiny
    src, out, tmp = tmp_path / "in", tmp_path / "out", tmp_path / "tmp"
    src.mkdir(), tmp.mkdir()
    for i in range(4):
        (src / f"m{i}.pth").write_bytes(ckpt.read_bytes())
    proc = reparam("batch", src, "--spec", spec, "-o", out, "-j", "2", tmpdir=tmp, wait=False)
    deadline = time.monotonic() + 120
    workers: set[int] = set()
    while time.monotonic() < deadline:  # wait for the workers and the pending lines
        workers = _children(proc.pid)
        partial = out / ".manifest.jsonl.partial"
        if len(workers) >= 2 and partial.exists() and partial.read_text().count("pending") == 4:
            break
        time.sleep(0.2)
    assert len(workers) >= 2
    time.sleep(random.uniform(0.0, 3.0))
    proc.kill()
    proc.communicate(timeout=60)
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers)
    # Every output that exists is recorded in the (partial) manifest; no temporary is visible.
    recorded = {json.loads(line)["output"] for line in (out / ".manifest.jsonl.partial").read_text().splitlines()
                if line.strip()}
    outputs = {str(p) for p in out.iterdir() if p.name != ".manifest.jsonl.partial"}
    assert outputs <= recorded, (outputs, recorded)
    assert all(not p.name.startswith(".") or p.name == ".manifest.jsonl.partial" for p in out.iterdir())
    assert listing(tmp) == []
    # --resume finishes the job.
    result = run_cli("batch", src, "--spec", spec, "-o", out, "--resume", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["converted"] + json.loads(result.stdout)["skipped"] == 4


def test_manifest_junk_is_ignored_with_a_note_and_failed_runs_keep_records(tiny, tmp_path, monkeypatch):
    spec, ckpt = tiny
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "a.pth").write_bytes(ckpt.read_bytes())
    init_checkpoint(str(spec), src / "b.pth", seed=1)
    assert run_cli("batch", src, "--spec", spec, "-o", out, "--no-verify").exit_code == 0
    # A plain run that fails (the outputs exist) keeps the records a later --resume needs.
    assert run_cli("batch", src, "--spec", spec, "-o", out, "--no-verify").exit_code == 1
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert all(e["status"] == "failed" and e["previous"]["status"] == "converted" for e in lines)
    # A run stopped before it starts converting leaves the manifest alone.
    import reparam_cli.pipeline.batch as batch

    real_plan, calls = batch.plan, []

    def stop(*args, **kwargs):  # the second plan, made once the manifest is locked
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_plan(*args, **kwargs)

    before = (out / "manifest.jsonl").read_bytes()
    with monkeypatch.context() as m:
        m.setattr(batch, "plan", stop)
        assert run_cli("batch", src, "--spec", spec, "-o", out, "--no-verify").exit_code == 130
    assert len(calls) == 2
    assert (out / "manifest.jsonl").read_bytes() == before and not (out / ".manifest.jsonl.partial").exists()
    with open(out / "manifest.jsonl", "ab") as f:  # junk: binary, wrong types, not an object
        f.write(b"\xff\xfe\x00garbage\n[1, 2]\n")
        f.write(json.dumps({"relpath": 5, "status": "converted", "input_sha256": 1, "output_sha256": []}).encode())
        f.write(b"\n")
    result = run_cli("batch", src, "--spec", spec, "-o", out, "--resume", "--json", "--no-verify")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["skipped"] == 2 and summary["converted"] == 0
    assert any("manifest.jsonl: ignored 3 line(s)" in n for n in summary["notes"])


def test_what_cannot_be_an_input_becomes_a_manifest_line(tiny, tmp_path, monkeypatch):
    spec, ckpt = tiny
    src, out = tmp_path / "in", tmp_path / "out"
    (src / "sub").mkdir(parents=True)
    (src / "ok.pth").write_bytes(ckpt.read_bytes())
    (src / "dangling.pth").symlink_to(src / "missing.pth")
    (src / "loop1.pth").symlink_to(src / "loop2.pth")
    (src / "loop2.pth").symlink_to(src / "loop1.pth")
    (src / "zero.pth").symlink_to("/dev/zero")
    os.mkfifo(src / "fifo.pth")
    (src / "sub" / "self").symlink_to(src / "sub")  # a folder loop
    (src / "locked").mkdir()
    result = run_cli("batch", src, "--spec", spec, "-o", out, "-r", "--json", "--no-verify")
    assert result.exit_code == 1, result.stderr
    files = {e["relpath"]: e for e in json.loads(result.stdout)["files"]}
    assert files["ok.pth"]["status"] == "converted"
    assert files["dangling.pth"]["status"] == "skipped" and "dangling" in files["dangling.pth"]["error"]
    assert files["loop1.pth"]["status"] == "failed" and "loop" in files["loop1.pth"]["error"]
    assert files["zero.pth"]["status"] == "skipped" and "not a regular file" in files["zero.pth"]["error"]
    assert files["fifo.pth"]["status"] == "skipped"
    assert files["sub/self/"]["status"] == "skipped" and "not followed" in files["sub/self/"]["error"]
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert {e["relpath"] for e in lines} == set(files)
    # An unreadable folder (root reads everything, so the error is simulated).
    real_scandir = os.scandir

    def scandir(path="."):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    problems: list = []
    discover(src, recursive=True, problems=problems)
    assert ("locked/", "failed", "cannot read this folder: Permission denied") in problems


# --- trainer checkpoints with foreign classes -------------------------------------------------------

FOREIGN = '''
import argparse
class CfgNode(dict):  # like yacs: a dict subclass with attributes
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.__dict__["frozen"] = True
class HistoryBuffer:
    def __init__(self): self.data = [1.0, 2.0]
class MessageHub:  # like mmengine
    def __init__(self): self.log_scalars = {"loss": HistoryBuffer()}
class Marker:
    def __init__(self, path): self.path = path
    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.path}",))
'''


def test_trainer_checkpoint_with_foreign_classes_loads_without_running_code(tiny, tmp_path, monkeypatch):
    import numpy as np

    spec, ckpt = tiny
    state = torch.load(ckpt, weights_only=True)
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "trainer_lib_xyz.py").write_text(textwrap.dedent(FOREIGN))
    monkeypatch.syspath_prepend(str(pkg))
    import trainer_lib_xyz as lib

    marker = tmp_path / "PWNED"
    saved = tmp_path / "trainer.pth"
    opt_state = {"state": {0: {"step": np.int64(3), "exp_avg": torch.zeros(2)}}, "param_groups": [{"lr": np.float64(.1)}]}
    torch.save({"state_dict": state, "cfg": lib.CfgNode(model=lib.CfgNode(depth=3)), "args": argparse.Namespace(lr=1),
                "optimizer": opt_state, "message_hub": lib.MessageHub(), "epoch": np.int32(7),
                "hook": lib.Marker(marker)}, saved)
    # Uninstall the library: its classes are now foreign.
    del sys.modules["trainer_lib_xyz"]
    (pkg / "trainer_lib_xyz.py").unlink()
    result = run_cli("convert", saved, "--spec", spec, "-o", tmp_path / "o.safetensors", "--json")
    assert result.exit_code == 0, result.stderr
    notes = " ".join(json.loads(result.stdout)["notes"])
    for where in ("cfg (trainer_lib_xyz.CfgNode)", "message_hub (trainer_lib_xyz.MessageHub)", "hook (posix.system)",
                  "epoch (numpy"):
        assert where in notes, notes
    assert not marker.exists() and "trainer_lib_xyz" not in sys.modules
    raw = read_raw(saved)  # the placeholders record what the pickle gave them, inertly
    assert raw["cfg"]._pickled["items"]["model"]._pickled["items"] == {"depth": 3}
    assert raw["hook"]._pickled["args"] == (f"touch {marker}",) and isinstance(raw["args"], argparse.Namespace)
    assert torch.equal(read_checkpoint(saved).state["linear.weight"], state["linear.weight"])
    # The legacy (non-zip) format goes the same way.
    torch.save({"state_dict": state, "hook": _Marker(marker)}, tmp_path / "legacy.pth",
               _use_new_zipfile_serialization=False)
    assert set(read_checkpoint(tmp_path / "legacy.pth").state) == set(state) and not marker.exists()


class _Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_pickled_module_walks_into_a_state_dict(tiny):
    from reparam_cli.pipeline.specs import load_spec
    from reparam_cli.io.unpickle import is_module_placeholder, module_state_dict, restricted_load

    spec, ckpt = tiny
    model = load_spec(str(spec)).build()
    model.register_buffer("scratch", torch.ones(1), persistent=False)  # not part of a state dict
    path = ckpt.parent / "whole.pt"
    torch.save({"model": model.half(), "ema": None}, path)
    raw = restricted_load(path)
    assert is_module_placeholder(raw["model"])
    flat = module_state_dict(raw["model"])
    expected = model.state_dict()
    assert flat.keys() == expected.keys() and all(torch.equal(flat[k], expected[k]) for k in expected)


def test_importing_a_users_spec_leaves_no_pycache_beside_it(tmp_path, monkeypatch):
    """A spec is the user's file: reparam imports it (and the modules a YAML spec names) without
    writing __pycache__ into their folders, whatever PYTHONDONTWRITEBYTECODE says."""
    from reparam_cli.pipeline.specs import load_spec

    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    code = "from torch import nn\n\ndef build_model():\n    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))\n"
    (tmp_path / "pyspec_nocache.py").write_text(code)
    (tmp_path / "yamlmod_nocache.py").write_text(code)
    (tmp_path / "net.yaml").write_text("name: net\nbuilder: yamlmod_nocache:build_model\ninput_shape: [1, 3, 8, 8]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = sorted(p.name for p in tmp_path.iterdir())
    for ref in (tmp_path / "pyspec_nocache.py", tmp_path / "net.yaml"):
        assert isinstance(load_spec(str(ref)).build(), torch.nn.Sequential)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no __pycache__
    assert sys.dont_write_bytecode is False  # restored
