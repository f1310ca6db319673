"""Trust, round two (issue 20): the bad-input corpus for what the first corpus did not reach. Each
case: its exit code, ONE `error:` line on stderr (no traceback, not the catch-all `unexpected ...`),
nothing left in the output folder or $TMPDIR, inputs byte-identical, no code run from a file."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from reparam_cli.pipeline.conversion import convert_checkpoint, init_checkpoint

from .helpers import TINY_REPVGG_YAML, run_cli

ROOT = Path(__file__).resolve().parents[1]

MUTATING_SPEC = """\
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, how="inplace"):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.linear = nn.Linear(4, 5)
        self.how = how

    def forward(self, x):
        if self.how == "inplace":
            self.linear.weight.mul_(1.5)
        elif self.how == "data":
            self.linear.weight.data.mul_(1.5)
        return self.linear(self.bn(self.conv(x)).mean((2, 3)))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.emb = nn.Linear(4, 4, bias=False)
        self.head = nn.Linear(4, 4, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.emb(self.bn(self.conv(x)).mean((2, 3))))


class Returns(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.kind = kind

    def forward(self, x):
        y = self.bn(self.conv(x))
        return {"none": None, "str": "hello", "gen": (t for t in [y])}[self.kind]


def build_none():
    return Returns("none")


def build_str():
    return Returns("str")


def build_gen():
    return Returns("gen")


def build_model():
    return Net("none")


def build_inplace():
    return Net("inplace")


def build_data():
    return Net("data")


def build_tied():
    return Tied()
"""

ALIAS_BOMB = "".join(f"{a}: &{a} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['x'] * 9)}]\n"
                     for a, p in zip("abcdefg", ["", *"abcdef"])) + \
    "builder: reparam_cli.blocks.repvgg:RepVGG\ndescription: *g\n"


def _sha(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


def _tmp_entries() -> set[str]:
    import tempfile

    return set(os.listdir(tempfile.gettempdir()))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("trust2-inputs")
    marker = d.parent / f"{d.name}-MARKER"
    (d / "tiny.yaml").write_text(TINY_REPVGG_YAML)
    init_checkpoint(str(d / "tiny.yaml"), d / "t.pth", seed=0)
    (d / "net.py").write_text(MUTATING_SPEC)
    init_checkpoint(f"{d / 'net.py'}:build_model", d / "net.pth", seed=0)
    init_checkpoint(f"{d / 'net.py'}:build_none", d / "ret.pth", seed=0)
    state = torch.load(d / "net.pth", weights_only=True)
    state["conv.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, d / "nan.pth")
    state["conv.weight"][0, 0, 0, 0] = float("inf")
    torch.save(state, d / "inf.pth")
    # A spec name that is a path: a YAML outside the specs folder whose builder would touch the marker.
    (d / "evil.py").write_text(f"def build_model():\n    open({str(marker)!r}, 'w')\n")
    (d / "evil.yaml").write_text(f"builder: {d / 'evil.py'}:build_model\n")
    (d / "bomb.yaml").write_text(ALIAS_BOMB)
    (d / "deep.yaml").write_text("builder: x\nargs: {a: " + "[" * 5000 + "]" * 5000 + "}\n")
    # 200,000-deep JSON in a safetensors header
    deep = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "z": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    (d / "deep.safetensors").write_bytes(struct.pack("<Q", len(deep)) + deep + b"\0" * 4)
    # A 3 KB pickle whose shared references unfold into 10^14 paths, beside a foreign class.
    (d / "shared.pth").write_bytes(_shared_pickle())
    return {"dir": d, "marker": marker}


def _shared_pickle() -> bytes:
    import io
    import types

    cls = type("Foreign", (), {"__module__": "somelib_trust2"})
    module = types.ModuleType("somelib_trust2")
    module.Foreign = cls
    sys.modules["somelib_trust2"] = module
    try:
        x = cls()
        for _ in range(7):
            x = [x] * 100
        buf = io.BytesIO()
        torch.save({"state_dict": {"w": torch.zeros(2)}, "b": x}, buf)
        return buf.getvalue()
    finally:
        del sys.modules["somelib_trust2"]


# (id, argv, exit code, text in the one stderr line)
CASES = [
    ("spec-name-traversal", "convert {in}/t.pth -s ../../../../../../..{in}/evil -o {out}/o.safetensors", 2,
     "unknown spec"),
    ("spec-name-traversal-init", "init ../../../../../../..{in}/evil -o {out}/o.pth", 2, "unknown spec"),
    ("spec-name-slash", "init repvgg-a0/../repvgg-a0 -o {out}/o.pth", 2, "unknown spec"),
    ("spec-yaml-alias-bomb", "init {in}/bomb.yaml -o {out}/o.pth", 2, "alias"),
    ("spec-yaml-deep", "init {in}/deep.yaml -o {out}/o.pth", 2, "deep"),
    ("spec-query-key-path", "init repvgg-a0?a/b=1 -o {out}/o.pth", 2, "not a keyword argument name"),
    ("spec-query-huge-number", "init repvgg-a0?num_classes=" + "9" * 100_000 + " -o {out}/o.pth", 2, "longer than"),
    ("spec-query-64-bit", "init repvgg-a0?num_classes=" + str(2**64) + " -o {out}/o.pth", 2, "out of range"),
    ("rtol-nan", "convert {in}/t.pth -s {in}/tiny.yaml -o {out}/o.safetensors --rtol nan", 2, "--rtol"),
    ("atol-inf", "convert {in}/t.pth -s {in}/tiny.yaml -o {out}/o.safetensors --atol inf", 2, "--atol"),
    ("seed-2-64", f"convert {{in}}/t.pth -s {{in}}/tiny.yaml -o {{out}}/o.safetensors --seed {2**64}", 2, "--seed"),
    ("seed-negative", "convert {in}/t.pth -s {in}/tiny.yaml -o {out}/o.safetensors --seed -1", 2, "--seed"),
    ("batch-seed-2-64", f"batch {{in}} -s {{in}}/tiny.yaml -o {{out}}/b --seed {2**64}", 2, "--seed"),
    ("init-seed-2-64", f"init {{in}}/tiny.yaml -o {{out}}/i.pth --seed {2**64}", 2, "--seed"),
    ("forward-mutates-in-place", "convert {in}/net.pth -s {in}/net.py:build_inplace -o {out}/o.safetensors "
     "--input-shape 1,3,8,8", 2, "tensor linear.weight in place"),
    ("forward-mutates-data", "convert {in}/net.pth -s {in}/net.py:build_data -o {out}/o.safetensors "
     "--input-shape 1,3,8,8", 2, "tensor linear.weight (through .data)"),
    ("forward-mutates-torchscript", "convert {in}/net.pth -s {in}/net.py:build_inplace -o {out}/o.pt -f torchscript "
     "--input-shape 1,3,8,8", 2, "linear.weight"),
    ("nan-checkpoint", "convert {in}/nan.pth -s {in}/net.py -o {out}/o.safetensors --input-shape 1,3,8,8", 2,
     "tensor conv.weight holds NaN"),
    ("nan-checkpoint-no-verify", "convert {in}/nan.pth -s {in}/net.py -o {out}/o.safetensors --no-verify", 2,
     "--allow-nonfinite"),
    ("inf-checkpoint-no-verify", "convert {in}/inf.pth -s {in}/net.py -o {out}/o.safetensors --no-verify", 2,
     "conv.weight"),
    *[(f"forward-returns-{k}", f"convert {{in}}/ret.pth -s {{in}}/net.py:build_{k} -o {{out}}/o.safetensors "
       "--input-shape 1,3,8,8", 2, "holds no tensor to compare") for k in ("none", "str", "gen")],
    ("deep-safetensors-convert", "convert {in}/deep.safetensors -s {in}/net.py -o {out}/o.safetensors", 2,
     "nests deeper"),
    ("deep-safetensors-inspect", "inspect {in}/deep.safetensors", 2, "nests deeper"),
]


@pytest.mark.parametrize("argv,code,expect", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cli_bad_input(inputs, tmp_path, monkeypatch, argv, code, expect):
    folder, out = inputs["dir"], tmp_path / "out"
    out.mkdir()
    # A $TMPDIR of this test's own: another test process writing to the shared one is no leftover.
    private = tmp_path / "tmpdir"
    private.mkdir()
    monkeypatch.setenv("TMPDIR", str(private))
    monkeypatch.setattr("tempfile.tempdir", None)
    before, tmp_before = _sha(folder), _tmp_entries()
    result = run_cli(*argv.format(**{"in": folder, "out": out}).split())
    err = result.stderr
    assert result.exit_code == code, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert expect in err and "Traceback" not in err, err
    assert not re.search(r"unexpected \w+(Error|Exception)", err), err
    assert _sha(out) == {} and _sha(folder) == before
    assert _tmp_entries() <= tmp_before
    assert not inputs["marker"].exists()


def test_allow_nonfinite_converts_explicitly(inputs, tmp_path):
    d = inputs["dir"]
    state = torch.load(d / "t.pth", weights_only=True)
    state["linear.weight"][0, 0] = float("nan")  # the classifier: nothing is folded into it
    torch.save(state, tmp_path / "nan.pth")
    result = run_cli("convert", tmp_path / "nan.pth", "-s", d / "tiny.yaml", "-o", tmp_path / "o.safetensors",
                     "--no-verify")
    assert result.exit_code == 2 and "linear.weight" in result.stderr
    result = run_cli("convert", tmp_path / "nan.pth", "-s", d / "tiny.yaml", "-o", tmp_path / "o.safetensors",
                     "--no-verify", "--allow-nonfinite")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "o.safetensors").exists()


def test_weights_written_are_the_checkpoints(inputs, tmp_path):
    """A forward that leaves its weights alone: the file holds exactly the checkpoint's linear weight."""
    from safetensors.torch import load_file

    d = inputs["dir"]
    convert_checkpoint(d / "net.pth", f"{d / 'net.py'}:build_model", tmp_path / "o.safetensors")
    written = load_file(str(tmp_path / "o.safetensors"))
    state = torch.load(d / "net.pth", weights_only=True)
    assert torch.equal(written["linear.weight"], state["linear.weight"])


def test_tied_weights_convert(inputs, tmp_path):
    """One tensor under two names (a weight-tied head), stored once (safetensors' save_model): converts
    and verifies; the deploy file rebuilds with the tie."""
    from safetensors.torch import save_model

    d = inputs["dir"]
    sys.path.insert(0, str(d))
    try:
        import net  # noqa: PLC0415
    finally:
        sys.path.remove(str(d))
    model = net.build_tied()
    save_model(model, str(tmp_path / "tied.safetensors"))
    result = run_cli("convert", tmp_path / "tied.safetensors", "-s", f"{d / 'net.py'}:build_tied", "-o",
                     tmp_path / "o.safetensors", "--input-shape", "1,3,8,8", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["ok"] is True


def test_shared_references_pickle_is_quick(inputs):
    """10^14 paths through one shared list: each object is walked once."""
    start = time.monotonic()
    result = run_cli("inspect", inputs["dir"] / "shared.pth", "--json")
    assert result.exit_code == 0, result.stderr
    assert time.monotonic() - start < 20


def test_placeholder_walk_budget():
    from reparam_cli.errors import CheckpointError
    from reparam_cli.io import unpickle

    many = [[object()] for _ in range(50)]
    old = unpickle.WALK_BUDGET
    unpickle.WALK_BUDGET = 20
    try:
        with pytest.raises(CheckpointError, match="more than 20 objects"):
            unpickle.placeholders({"a": many})
    finally:
        unpickle.WALK_BUDGET = old


def test_truncated_while_read_is_no_sigbus(tmp_path):
    """read_tensors does not memory-map: truncating the file afterwards cannot kill the process."""
    from safetensors.torch import save_file

    from reparam_cli.io.safetensors import read_tensors

    path = tmp_path / "x.safetensors"
    save_file({"a": torch.randn(1000, 100), "b": torch.arange(7)}, str(path))
    tensors = read_tensors(path)
    os.truncate(path, 100)
    assert float(tensors["a"].abs().sum()) > 0 and tensors["b"].tolist() == list(range(7))


# --- batch --------------------------------------------------------------------------------------------

def test_batch_survives_any_single_file(inputs, tmp_path):
    """A name that is not UTF-8 and 200,000-deep metadata: each is that file's manifest line."""
    d = inputs["dir"]
    src = tmp_path / "in"
    src.mkdir()
    (src / "good.pth").write_bytes((d / "net.pth").read_bytes())
    os.link(d / "net.pth", os.fsdecode(bytes(src) + b"/bad\xffname.pth"))
    (src / "deep.safetensors").write_bytes((d / "deep.safetensors").read_bytes())
    result = run_cli("batch", src, "-s", d / "net.py", "-o", tmp_path / "out", "--input-shape", "1,3,8,8", "--json")
    assert result.exit_code == 1, result.stderr
    lines = [json.loads(x) for x in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    status = {Path(e["input"]).name: e["status"] for e in lines}
    assert status == {"good.pth": "converted", "bad\\xffname.pth": "converted", "deep.safetensors": "failed"}
    # lossless: the recorded bytes give the file back
    import base64

    assert os.path.exists(base64.b64decode(next(e["input_bytes"] for e in lines if "bad" in e["input"])))


def test_batch_planted_symlink_partial_destroys_nothing(inputs, tmp_path):
    d = inputs["dir"]
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    (src / "a.pth").write_bytes((d / "net.pth").read_bytes())
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (out / ".manifest.jsonl.partial").symlink_to(victim)
    result = run_cli("batch", src, "-s", d / "net.py", "-o", out, "--input-shape", "1,3,8,8")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "symbolic link" in result.stderr
    assert victim.read_text() == "precious\n"
    # a link planted as the manifest itself is replaced by the manifest, its target untouched
    (out / ".manifest.jsonl.partial").unlink()
    (out / "manifest.jsonl").symlink_to(victim)
    result = run_cli("batch", src, "-s", d / "net.py", "-o", out, "--input-shape", "1,3,8,8", "--resume")
    assert result.exit_code == 0, result.stderr
    assert victim.read_text() == "precious\n" and not (out / "manifest.jsonl").is_symlink()


def test_killed_rename_step_is_cleaned_by_next_run(inputs, tmp_path):
    """kill -9 between the hidden link and the final rename of --overwrite: the next run removes it."""
    from reparam_cli.io.safeio import _temp_name

    d = inputs["dir"]
    out = tmp_path / "o.safetensors"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    name = _temp_name(tmp_path, out.name, out.suffix).name.replace(f"-{os.getpid()}-", f"-{dead.pid}-")
    (tmp_path / name).write_bytes(b"half")
    result = run_cli("convert", d / "net.pth", "-s", d / "net.py", "-o", out, "--input-shape", "1,3,8,8",
                     "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.safetensors"]


# --- one error path -------------------------------------------------------------------------------------

def _reparam(*args: str, stdout=subprocess.PIPE, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("REPARAM_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "reparam_cli", *args], stdout=stdout, stderr=subprocess.PIPE,
                          env=env, timeout=120, **kw)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_stdout_is_one_line():
    with open("/dev/full", "w") as full:
        r = _reparam("specs", "--json", "--no-params", stdout=full)
    err = r.stderr.decode()
    assert r.returncode == 2 and err.count("\n") == 1 and "cannot write to stdout" in err, err


def test_closed_stdout_is_one_line():
    r = _reparam("specs", "--json", "--no-params", stdout=None, stdin=subprocess.DEVNULL, pass_fds=(),
                 preexec_fn=lambda: os.close(1))
    err = r.stderr.decode()
    assert r.returncode == 2 and err.count("\n") == 1 and "stdout" in err and "Traceback" not in err, err


def test_escaped_exception_is_one_line(monkeypatch):
    """Whatever escapes a command (here: an error writing the JSON report) is one line, exit 2."""
    from reparam_cli.commands import specs

    def broken(_report):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(specs, "echo_json", broken)
    result = run_cli("specs", "--json", "--no-params")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_no_vendored_click_internals():
    """typer>=0.12,<0.29: some vendor click (typer._click), with or without Abort. The app reaches
    click's exceptions only as UsageError/ClickException (in every click) or through getattr."""
    for path in (ROOT / "reparam_cli").rglob("*.py"):
        text = path.read_text()
        assert "typer._click" not in text and "from click" not in text and "import click" not in text, path
    tree = ast.parse((ROOT / "reparam_cli" / "commands" / "app.py").read_text())
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id == "_click"}
    assert used <= {"UsageError", "ClickException"}, used


@pytest.mark.skipif(not os.environ.get("REPARAM_OTHER_TYPER_PYTHON"),
                    reason="set REPARAM_OTHER_TYPER_PYTHON (and REPARAM_OTHER_TYPER_DIR, a pip --target folder "
                           "with another typer): see scripts/corpus_other_typer.sh")
def test_corpus_on_other_typer():
    r = subprocess.run(["bash", str(ROOT / "scripts" / "corpus_other_typer.sh"), os.environ["REPARAM_OTHER_TYPER_PYTHON"],
                        os.environ.get("REPARAM_OTHER_TYPER_DIR", "")], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


# --- third-party droppings --------------------------------------------------------------------------------

def test_exporters_leave_nothing_in_tmpdir(inputs, tmp_path, monkeypatch):
    """onnxruntime writes `.ses` and torch its inductor cache into $TMPDIR: a private folder, removed
    (also for `reparam verify` of the ONNX file)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import tempfile

    tt = tmp_path / "tt"
    tt.mkdir()
    monkeypatch.setenv("TMPDIR", str(tt))
    monkeypatch.setattr(tempfile, "tempdir", str(tt))
    d = inputs["dir"]
    result = run_cli("convert", d / "t.pth", "-s", d / "tiny.yaml", "-o", tmp_path / "o.onnx", "-f", "onnx")
    assert result.exit_code == 0, result.stderr
    assert os.listdir(tt) == []
    result = run_cli("verify", d / "t.pth", tmp_path / "o.onnx", "-s", d / "tiny.yaml")
    assert result.exit_code == 0, result.stderr
    assert os.listdir(tt) == []


def test_private_tmpdir_of_a_killed_run_is_removed(tmp_path, monkeypatch):
    import tempfile

    from reparam_cli.io.safeio import _HOST, private_tmpdir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".reparam-private-{_HOST}-{dead.pid}-0123abcd"
    (stale / "sub").mkdir(parents=True)
    with private_tmpdir() as folder:
        assert tempfile.gettempdir() == str(folder) and os.environ["TMPDIR"] == str(folder)
        (folder / ".ses").write_text("x")
    assert os.listdir(tmp_path) == []


def test_batch_output_names_injective_after_unicode_normalisation():
    import unicodedata

    from reparam_cli.pipeline.batch import output_names

    nfc, nfd = unicodedata.normalize("NFC", "café.pth"), unicodedata.normalize("NFD", "café.pth")
    names = output_names([nfc, nfd], "safetensors")
    folded = {unicodedata.normalize("NFC", n).casefold() for n in names.values()}
    assert nfc != nfd and len(folded) == 2


def test_error_after_a_signal_keeps_the_signals_exit_code(monkeypatch):
    """SIGTERM cut an import in half and was swallowed; the import failing again afterwards
    ("cannot load module more than once per process") is still exit 143, not exit 2."""
    from reparam_cli.commands.common import guarded
    from reparam_cli.io import signals

    monkeypatch.setattr(signals, "RECEIVED", [15])

    def action():
        raise ImportError("cannot load module more than once per process")

    with pytest.raises(Exception) as info:  # typer.Exit (click's Exit, vendored or not)
        guarded(action, as_json=False)
    assert info.value.exit_code == 143


def test_closed_stdin_is_one_line():
    r = _reparam("inspect", "-", stdin=None, preexec_fn=lambda: os.close(0))
    err = r.stderr.decode()
    assert r.returncode == 2 and err.count("\n") == 1 and "stdin is closed" in err, err
