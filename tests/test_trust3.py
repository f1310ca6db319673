"""Trust, round two, the rest (issue 20): every file operation in the output folder goes through one
descriptor of that folder (planted and swapped symbolic links redirect nothing), `kill -9` at the
rename step leaves nothing after the next run, manifest lines keep file names losslessly, and the
remaining catch-all messages have their own sentence."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from reparam_cli.errors import OutputError
from reparam_cli.io import safeio
from reparam_cli.io.safeio import atomic_output

from .helpers import TINY_REPVGG_YAML, run_cli, spec_and_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(spec, training checkpoint) of a small RepVGG."""
    return spec_and_checkpoint(tmp_path_factory.mktemp("trust3"), TINY_REPVGG_YAML)


def tree(folder: Path) -> dict[str, bytes | str]:
    """Every entry below `folder` (hidden ones included, links not followed) with its contents."""
    out: dict[str, bytes | str] = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = ("link:" + os.readlink(p)) if p.is_symlink() else "dir" if p.is_dir() else p.read_bytes()
    return out


def reparam(*args, tmpdir: Path, prelude: str = "") -> subprocess.CompletedProcess:
    """The CLI in a fresh interpreter with its own $TMPDIR; `prelude` runs first (test hooks)."""
    code = prelude + "\nimport sys\nfrom reparam_cli.commands.app import main\nsys.argv = ['reparam', *sys.argv[1:]]\nmain()\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmpdir), "OMP_NUM_THREADS": "1"}
    env.pop("REPARAM_DEBUG", None)
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, timeout=300)


# --- one descriptor of the output folder ----------------------------------------------------------------

@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("unnamed", [True, False], ids=["O_TMPFILE", "named-temporary"])
def test_a_folder_swapped_for_a_symlink_mid_write_redirects_nothing(tmp_path, monkeypatch, overwrite, unnamed):
    """The output's folder is renamed away and a symlink to another folder put in its place while
    the output is written: the output (and its temporary, link and rename) stays in the folder that
    was opened; the other folder, holding a file of the same name, is untouched."""
    if not unnamed:
        monkeypatch.setattr(safeio, "_open_unnamed", lambda folder: None)
    (tmp_path / "a" / "out").mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "m.bin").write_bytes(b"precious")
    (victim / "out").symlink_to(victim)  # victim/out/m.bin is victim/m.bin
    if overwrite:
        (tmp_path / "a" / "out" / "m.bin").write_bytes(b"old")
    before = tree(victim)
    with atomic_output(tmp_path / "a" / "out" / "m.bin", overwrite=overwrite) as tmp:
        tmp.write_bytes(b"new")
        (tmp_path / "a").rename(tmp_path / "moved")
        (tmp_path / "a").symlink_to(victim)  # a/out/m.bin now resolves to victim/m.bin
    assert tree(victim) == before
    assert tree(tmp_path / "moved") == {"out": "dir", "out/m.bin": b"new"}


def test_a_symlink_as_the_output_name_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / "m.bin").symlink_to(victim)
    with pytest.raises(OutputError, match="already exists"):
        with atomic_output(out / "m.bin") as tmp:
            tmp.write_bytes(b"new")
    with atomic_output(out / "m.bin", overwrite=True) as tmp:
        tmp.write_bytes(b"new")
    assert victim.read_text() == "precious" and tree(out) == {"m.bin": b"new"}


def _batch_inputs(tmp_path: Path, ckpt: Path, subfolders=("a", "b")) -> Path:
    src = tmp_path / "in"
    for sub in subfolders:
        (src / sub).mkdir(parents=True)
        (src / sub / "x.pth").write_bytes(ckpt.read_bytes())
    return src


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_batch_planted_folder_symlink_destroys_nothing(tiny, tmp_path, jobs):
    """A symlink planted as a mirrored subfolder of the output folder (OUT/a -> elsewhere) is refused
    for that file (its manifest line says why), never followed; the other files convert."""
    spec, ckpt = tiny
    src, out, victim = _batch_inputs(tmp_path, ckpt), tmp_path / "out", tmp_path / "victim"
    out.mkdir()
    victim.mkdir()
    (victim / "x.deploy.safetensors").write_bytes(b"precious")
    (out / "a").symlink_to(victim)
    before = tree(victim)
    result = run_cli("batch", src, "-s", spec, "-o", out, "--recursive", "--no-verify", "--jobs", jobs, "--json")
    assert result.exit_code == 1, result.stderr
    assert tree(victim) == before
    lines = {e["relpath"]: e for e in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    assert lines["b/x.pth"]["status"] == "converted"
    assert lines["a/x.pth"]["status"] == "failed" and "symbolic link" in lines["a/x.pth"]["error"]
    assert sorted(p.name for p in out.iterdir()) == ["a", "b", "manifest.jsonl"]


def test_batch_planted_lock_and_file_symlinks_destroy_nothing(tiny, tmp_path):
    """A symlink planted as an output file is replaced (with --overwrite) or refused, never written
    through; one planted as a shard's partial manifest (the lock) stops the run in one line."""
    spec, ckpt = tiny
    src, out, victim = _batch_inputs(tmp_path, ckpt, ("a",)), tmp_path / "out", tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (out / "a").mkdir(parents=True)
    (out / "a" / "x.deploy.safetensors").symlink_to(victim)
    result = run_cli("batch", src, "-s", spec, "-o", out, "--recursive", "--no-verify")
    assert result.exit_code == 1 and victim.read_text() == "precious\n"
    result = run_cli("batch", src, "-s", spec, "-o", out, "--recursive", "--no-verify", "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert victim.read_text() == "precious\n" and not (out / "a" / "x.deploy.safetensors").is_symlink()
    (out / ".manifest.shard-0-of-2.jsonl.partial").symlink_to(victim)
    result = run_cli("batch", src, "-s", spec, "-o", out, "--recursive", "--no-verify", "--shard", "0/2")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "symbolic link" in result.stderr
    assert victim.read_text() == "precious\n"


def test_worker_refuses_an_output_folder_replaced_since_the_batch_opened_it(tmp_path):
    """A worker opens the output folder by path once; if that is no longer the folder the batch
    opened (same device and inode), its files fail instead of going elsewhere."""
    from reparam_cli.errors import ReparamError
    from reparam_cli.pipeline import batch

    (tmp_path / "out").mkdir()
    st = os.stat(tmp_path / "out")
    try:
        batch._set_output_root(str(tmp_path / "out"), (st.st_dev, st.st_ino))
        assert batch._ROOT[0] is not None
        os.close(batch._ROOT[0])
        batch._set_output_root(str(tmp_path / "out"), (st.st_dev, st.st_ino + 1))
        assert batch._ROOT[0] is None
        with pytest.raises(ReparamError, match="replaced"):
            batch._root_fd(batch.Task("x.pth", "in/x.pth", str(tmp_path / "out" / "x.deploy.safetensors"),
                                      out_rel="x.deploy.safetensors"))
    finally:
        batch._ROOT[:] = []


# --- kill -9 at the rename step ------------------------------------------------------------------------

KILL_AT_RENAME = """
import os, signal
import reparam_cli.io.safeio as safeio
safeio._before_replace = lambda: os.kill(os.getpid(), signal.SIGKILL)
"""


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and ".reparam-" in p.name)


def test_kill_at_the_rename_of_overwrite_leaves_nothing_after_the_next_run(tiny, tmp_path):
    spec, ckpt = tiny
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    out.mkdir(), tmp.mkdir()
    (out / "m.safetensors").write_bytes(b"old")
    args = ("convert", ckpt, "--spec", spec, "-o", out / "m.safetensors", "--no-verify")
    killed = reparam(*args, "--overwrite", tmpdir=tmp, prelude=KILL_AT_RENAME)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    left = _hidden(out)  # the kill point: linked under the hidden name, not yet renamed
    assert len(left) == 1 and left[0].startswith(".m.safetensors.reparam-")
    assert (out / "m.safetensors").read_bytes() == b"old"
    # the next run writing to that folder, with --overwrite or without (then refused), removes it
    again = reparam(*args, tmpdir=tmp)
    assert again.returncode == 2 and "already exists" in again.stderr.decode()
    assert _hidden(out) == [] and sorted(os.listdir(out)) == ["m.safetensors"] and os.listdir(tmp) == []


def test_kill_at_the_rename_of_the_batch_manifest_leaves_nothing_after_the_next_run(tiny, tmp_path):
    spec, ckpt = tiny
    src, out, tmp = _batch_inputs(tmp_path, ckpt, ("a",)), tmp_path / "out", tmp_path / "tmp"
    tmp.mkdir()
    args = ("batch", src, "-s", spec, "-o", out, "--recursive", "--no-verify")
    killed = reparam(*args, tmpdir=tmp, prelude=KILL_AT_RENAME)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    left = _hidden(out)
    assert len(left) == 1 and left[0].startswith(".manifest.jsonl.reparam-")
    assert (out / ".manifest.jsonl.partial").exists() and not (out / "manifest.jsonl").exists()
    again = reparam(*args, "--resume", tmpdir=tmp)
    assert again.returncode == 0, again.stderr.decode()
    assert sorted(os.listdir(out)) == ["a", "manifest.jsonl"] and os.listdir(tmp) == []
    (line,) = map(json.loads, (out / "manifest.jsonl").read_text().splitlines())
    assert line["status"] == "skipped"  # the output of the killed run was recorded in its partial file


# --- lossless and printable names in manifest lines ------------------------------------------------------

def test_manifest_names_are_lossless_and_printable(tiny, tmp_path):
    """A name with a byte that is not UTF-8 (b'\\xff') and a name that is that name's printable form
    (a backslash, 'x', 'f', 'f'): the manifest is strict UTF-8, shows both as `bad\\xff.pth`, keeps
    the exact bytes beside (base64), and --resume tells them apart and skips both."""
    spec, ckpt = tiny
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    odd, lookalike = bytes(src) + b"/bad\xff.pth", src / "bad\\xff.pth"
    Path(os.fsdecode(odd)).write_bytes(ckpt.read_bytes())
    lookalike.write_bytes(ckpt.read_bytes())
    result = run_cli("batch", src, "-s", spec, "-o", out, "--no-verify", "--json")
    assert result.exit_code == 0, result.stderr
    raw = (out / "manifest.jsonl").read_bytes()
    lines = [json.loads(x) for x in raw.decode("utf-8").splitlines()]  # strict UTF-8, no lone surrogates
    assert "\\udc" not in raw.decode() and {e["relpath"] for e in lines} == {"bad\\xff.pth"}
    exact = {base64.b64decode(e["relpath_bytes"]) if "relpath_bytes" in e else e["relpath"].encode() for e in lines}
    assert exact == {b"bad\xff.pth", b"bad\\xff.pth"}
    for e in lines:
        name = base64.b64decode(e["output_bytes"]) if "output_bytes" in e else e["output"].encode()
        assert os.path.isfile(name) and os.path.isfile(base64.b64decode(e["input_bytes"]) if "input_bytes" in e
                                                       else e["input"])
    report = json.loads(result.stdout)
    assert {f["relpath"] for f in report["files"]} == {"bad\\xff.pth"}
    result = run_cli("batch", src, "-s", spec, "-o", out, "--no-verify", "--resume", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["skipped"] == 2


def test_collisions_after_nfc_hold_for_names_that_are_not_utf8(tiny, tmp_path):
    """NFC and NFD spellings of one name, also next to a byte that is not UTF-8, get outputs that
    differ after NFC normalisation and case folding (what APFS compares)."""
    import unicodedata

    from reparam_cli.pipeline.batch import output_names

    spec, ckpt = tiny
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    names = [unicodedata.normalize(form, "Café") + tail for form in ("NFC", "NFD") for tail in (".pth", "\udcff.pth")]
    for name in names:
        (src / name).write_bytes(ckpt.read_bytes())
    mapped = output_names(names, "safetensors")
    assert len({unicodedata.normalize("NFC", o).casefold() for o in mapped.values()}) == 4
    result = run_cli("batch", src, "-s", spec, "-o", out, "--no-verify")
    assert result.exit_code == 0, result.stderr
    written = [os.fsdecode(n) for n in os.listdir(bytes(out)) if n != b"manifest.jsonl"]
    assert len({unicodedata.normalize("NFC", n).casefold() for n in written}) == 4


# --- the last catch-all messages get their own sentence --------------------------------------------------

def _one_error_line(stderr: str) -> str:
    assert stderr.count("\n") == 1 and stderr.startswith("error: ") and "Traceback" not in stderr, stderr
    assert "unexpected" not in stderr, stderr
    return stderr


def _unwritable_folder() -> Path:
    """A folder where creating a file fails with a real OSError even for root (sysfs)."""
    folder = Path("/sys/kernel")
    if not folder.is_dir():
        pytest.skip("needs /sys/kernel")
    try:
        os.close(os.open(folder / "reparam-probe", os.O_CREAT | os.O_WRONLY, 0o600))
    except OSError:
        return folder
    os.unlink(folder / "reparam-probe")
    pytest.skip("/sys/kernel is writable here")


REFUSED = ("permission denied", "read-only filesystem", "operation not permitted")


@pytest.mark.parametrize("argv", [
    ("convert", "{ckpt}", "-s", "{spec}", "-o", "{ro}/o.safetensors", "--no-verify"),
    ("init", "{spec}", "-o", "{ro}/t.pth"),
    ("batch", "{src}", "-s", "{spec}", "-o", "{ro}", "--no-verify"),
    ("batch", "{src}", "-s", "{spec}", "-o", "{ro}/new-folder", "--no-verify", "--json"),
], ids=["convert", "init", "batch-into", "batch-create"])
def test_unwritable_output_folder_is_one_line(tiny, tmp_path, argv):
    spec, ckpt = tiny
    ro = _unwritable_folder()
    src = tmp_path / "in"
    src.mkdir()
    (src / "t.pth").write_bytes(ckpt.read_bytes())
    result = run_cli(*(a.format(ckpt=ckpt, spec=spec, ro=ro, src=src) for a in argv))
    assert result.exit_code == 2, result.stderr
    line = _one_error_line(result.stderr)
    assert any(r in line for r in REFUSED) and str(ro) in line, line
    if "--json" in argv:
        assert json.loads(result.stdout)["ok"] is False


def test_unwritable_batch_subfolder_is_that_files_line(tiny, tmp_path, monkeypatch):
    """A mirrored subfolder that cannot be created (a read-only filesystem, simulated) fails that file
    with a sentence; the others convert."""
    import errno

    from reparam_cli.pipeline import batch

    spec, ckpt = tiny
    src, out = _batch_inputs(tmp_path, ckpt), tmp_path / "out"
    real = batch.open_folder

    def read_only(path, follow=True, dir_fd=None):
        if path == "a" and dir_fd is not None:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real(path, follow, dir_fd)

    monkeypatch.setattr(batch, "open_folder", read_only)
    result = run_cli("batch", src, "-s", spec, "-o", out, "--recursive", "--no-verify", "--json")
    assert result.exit_code == 1, result.stderr
    files = {f["relpath"]: f for f in json.loads(result.stdout)["files"]}
    assert files["b/x.pth"]["status"] == "converted"
    assert files["a/x.pth"]["error"] == "cannot create the folder a/ in the output folder: read-only filesystem"


def test_convert_with_stdin_closed_is_one_line(tiny, tmp_path):
    spec, _ = tiny
    r = subprocess.run([sys.executable, "-m", "reparam_cli", "convert", "-", "-s", str(spec), "-o",
                        str(tmp_path / "o.safetensors")], stdin=None, capture_output=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, preexec_fn=lambda: os.close(0))
    assert r.returncode == 2 and "stdin is closed" in _one_error_line(r.stderr.decode())
    assert os.listdir(tmp_path) == []


def test_unreadable_input_is_one_line():
    """/proc/self/mem is a regular file whose read fails (EIO): a sentence, not the catch-all."""
    r = subprocess.run([sys.executable, "-m", "reparam_cli", "inspect", "/proc/self/mem"], capture_output=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and "/proc/self/mem: input/output error" in _one_error_line(r.stderr.decode())


@pytest.mark.parametrize("exc, expect", [
    (OSError(5, "Input/output error"), "a file operation failed: input/output error"),
    (PermissionError(13, "Permission denied", "/x/y"), "/x/y: permission denied"),
    (OSError(30, "Read-only file system", "a", None, "b"), "a -> b: read-only filesystem"),
    (MemoryError(), "out of memory"),
    (RecursionError("maximum recursion depth exceeded"), "nests too deeply"),
    (RuntimeError("a bug"), "unexpected RuntimeError: a bug (set REPARAM_DEBUG=1 for a traceback)"),
])
def test_errors_no_command_names_get_a_sentence(capsys, monkeypatch, exc, expect):
    """What escapes a command's own handling: the operating system's and the interpreter's errors
    are sentences; only what is a bug keeps the catch-all."""
    from reparam_cli.commands.common import guarded

    monkeypatch.delenv("REPARAM_DEBUG", raising=False)

    def action():
        raise exc

    with pytest.raises(Exception) as info:
        guarded(action, as_json=False)
    assert info.value.exit_code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expect in err and err.startswith("error: "), err


def test_batch_writers_use_the_pinned_subfolder(tiny, tmp_path, monkeypatch):
    """Deep in the pipeline, the deploy file's writer does not resolve the subfolder's path again:
    it uses the descriptor the batch opened (O_NOFOLLOW) for it."""
    spec, ckpt = tiny
    src, out = _batch_inputs(tmp_path, ckpt, ("a",)), tmp_path / "out"
    opened: list[str] = []
    real = safeio.open_folder

    def spy(path, follow=True, dir_fd=None):
        opened.append(str(path))
        return real(path, follow, dir_fd)

    from reparam_cli.pipeline import batch

    monkeypatch.setattr(safeio, "open_folder", spy)
    monkeypatch.setattr(batch, "open_folder", spy)
    result = run_cli("batch", src, "-s", spec, "-o", out, "--recursive", "--no-verify")
    assert result.exit_code == 0, result.stderr
    assert (out / "a" / "x.deploy.safetensors").is_file()
    # by path: the output folder, once; its subfolder relative to it; nothing else (manifest included)
    assert opened == [str(out), "a"], opened


# --- torch's compiler cache ------------------------------------------------------------------------------

CONV_BN = """\
from torch import nn


def build_model():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 5))
"""


def test_a_conversion_leaves_no_compiler_cache_in_tmpdir(tmp_path):
    """Folding a plain conv + BatchNorm imports torch._dynamo on the way, which creates
    $TMPDIR/torchinductor_USER at once: every command runs with that cache in a private folder that
    is removed afterwards (a fresh interpreter, so the import happens during the run)."""
    (tmp_path / "net.py").write_text(CONV_BN)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    code = ("import sys, torch\nfrom reparam_cli.pipeline.conversion import init_checkpoint\n"
            "init_checkpoint(sys.argv[1] + ':build_model', sys.argv[2], seed=0)\n"
            "from reparam_cli.commands.app import main\n"
            "sys.argv = ['reparam', 'convert', sys.argv[2], '-s', sys.argv[1], '-o', sys.argv[3], "
            "'--input-shape', '1,3,8,8']\nmain()\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "net.py"), str(tmp_path / "net.pth"),
                        str(tmp_path / "o.safetensors")], env=env, capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert os.listdir(tmp) == []


def test_a_killed_runs_compiler_cache_is_removed_by_the_next_command(tmp_path, monkeypatch):
    import tempfile

    from reparam_cli.commands.common import guarded
    from reparam_cli.io.safeio import _HOST

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delitem(sys.modules, "torch._dynamo", raising=False)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".reparam-private-{_HOST}-{dead.pid}-0123abcd" / "inductor").mkdir(parents=True)
    seen = []
    guarded(lambda: seen.append(os.environ["TORCHINDUCTOR_CACHE_DIR"]), as_json=False)
    assert os.listdir(tmp_path) == [] and seen and seen[0].startswith(str(tmp_path))
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ


def test_an_input_shape_too_large_to_make_is_one_line_naming_it(tiny, tmp_path):
    """A verification input that cannot be allocated is blamed on --input-shape, not on a spec hook."""
    spec, ckpt = tiny
    result = run_cli("convert", str(ckpt), "--spec", str(spec), "-o", str(tmp_path / "d.safetensors"),
                     "--input-shape", "100000,3,10000,10000")
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "making the verification input failed" in lines[0]
    assert "smaller --input-shape" in lines[0] and "input hook" not in lines[0] and "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir())
